#!/usr/bin/env bash
# The TTS benchmark on a GPU machine (see docs/BENCHMARKS.md). Run from the repository root
# after bench/gpu/fetch_wheels.sh filled ./.whl, e.g. through the device tool with carry=[".whl"]:
#   bash bench/gpu/tts.sh
# Builds a random-weight Magpie + NanoCodec of the released shapes, serves it with the
# length cap at about the speaking rate of real speech (random weights never end speech),
# times decoder steps in process (STEP_BATCHES; empty skips), and sweeps concurrent sessions
# (SESSIONS, DURATION s each). Results land in $OUT (default /tmp/out), each JSON rewritten
# after every batch or load, so a run cut off at the device's 600 s keeps what it finished.
# Time with the defaults, estimated on one H100 from the 2026-11-22 runs (NeMo import ~20 s
# in each of the four processes): wheels + torch ~35 s, building the models ~50 s, two
# tts_steps passes (graphs, eager; 1 4 16 64 rows, ~93 steps each) ~90 s each, server load
# and warm-up ~50 s, the loads ~140 s (DURATION + the last turns' drain, longer at 32
# sessions, + client start) = ~7.5 min of the 10 allowed. More sessions or a longer DURATION
# adds ~DURATION + 10 s per load; run them in a second call.
source bench/gpu/setup.sh
if [ ! -f /tmp/magpie_random/magpie.nemo ]; then  # built whole; host_models.sh reuses it
  build_whole /tmp/magpie_random /tmp/magpie_random.part python3 -m bench.build_random_tts --out /tmp/magpie_random.part
fi
# Decoder steps in process, graphed and eager, by batch and by position in the segment.
STEP_BATCHES=${STEP_BATCHES-1 4 16 64}
if [ -n "$STEP_BATCHES" ]; then
  for graphs in 64 0; do
    python3 -m bench.tts_steps --model /tmp/magpie_random/magpie.nemo --device cuda --batches $STEP_BATCHES \
      --cuda-graph-max-batch $graphs --timeout-s 120 --json "$OUT/tts_steps_graphs$graphs.json" 2>&1 \
      | tee "$OUT/tts_steps_graphs$graphs.log" | grep --line-buffered -E '^\{|graph|cache|Error|Traceback|Timeout' || true
  done
fi
python3 -m servers.tts --model /tmp/magpie_random/magpie.nemo --port 8001 --device cuda \
  --max-frames-per-token 1.5 > "$OUT/tts_server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
wait_healthy $server http://127.0.0.1:8001 "$OUT/tts_server.log"
python3 -m bench.tts_load --url ws://127.0.0.1:8001 --sessions ${SESSIONS:-1 4 16 32} \
  --duration "${DURATION:-20}" --processes 4 --json "$OUT/tts_load.json"
