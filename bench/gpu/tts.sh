#!/usr/bin/env bash
# The TTS benchmark on a GPU machine (see docs/BENCHMARKS.md). Run from the repository root
# after bench/gpu/fetch_wheels.sh filled ./.whl, e.g. through the device tool with carry=[".whl"]:
#   bash bench/gpu/tts.sh
# Builds a random-weight Magpie + NanoCodec of the released shapes, serves it with the
# length cap at about the speaking rate of real speech (random weights never end speech),
# times decoder steps in process, and sweeps concurrent sessions. Results land in $OUT (default /tmp/out).
source bench/gpu/setup.sh
python3 -m bench.build_random_tts --out /tmp/magpie_random 2>&1 | tail -n 2
# Decoder steps in process, graphed and eager, by batch and by position in the segment.
for graphs in 64 0; do
  python3 -m bench.tts_steps --model /tmp/magpie_random/magpie.nemo --device cuda --batches ${STEP_BATCHES:-1 4 16 64} \
    --cuda-graph-max-batch $graphs --json "$OUT/tts_steps_graphs$graphs.json" 2>&1 | grep -E '^\{|graph|cache|Error' || true
done
python3 -m servers.tts --model /tmp/magpie_random/magpie.nemo --port 8001 --device cuda \
  --max-frames-per-token 1.5 > "$OUT/tts_server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
wait_healthy http://127.0.0.1:8001
python3 -m bench.tts_load --url ws://127.0.0.1:8001 --sessions ${SESSIONS:-1 4 8 16 32} \
  --duration "${DURATION:-30}" --processes 4 --json "$OUT/tts_load.json"
