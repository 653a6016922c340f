#!/usr/bin/env bash
# The ASR benchmark on a GPU machine (see docs/BENCHMARKS.md). Run from the repository root
# after bench/gpu/fetch_wheels.sh filled ./.whl, e.g. through the device tool with carry=[".whl"]:
#   bash bench/gpu/asr.sh
# Builds a random-weight model of the released shape, times engine steps in process by
# batch size (STEP_BATCHES; empty skips), then serves it and sweeps concurrent real-time
# sessions. GRAPH_MAX_BATCH, the largest step replayed from a CUDA graph in both, is 512
# here (the server's own default is 128). FRAME_MS=20 makes audio as Pipecat's transports
# deliver it (160 by default); clients send it at the server's step boundaries as
# NemotronSTTService does, or every frame with UNALIGNED=1. LONG_MINUTES=10 also times one
# continuous stream minute by minute.
# Results land in $OUT (default /tmp/out): each JSON is rewritten after every batch or load, and the
# step benchmarks' whole output (stack dumps on a hang included) is in $OUT/asr_steps.log.
source bench/gpu/setup.sh
graph_max_batch=${GRAPH_MAX_BATCH:-512}
if [ ! -f /tmp/asr_random.nemo ]; then  # host_models.sh builds and reuses the same one
  build_whole /tmp/asr_random.nemo /tmp/asr_random.part.nemo \
    python3 -m bench.build_random_asr --out /tmp/asr_random.part.nemo
fi
STEP_BATCHES=${STEP_BATCHES-1 64 256 512}
if [ -n "$STEP_BATCHES" ]; then
  python3 -m bench.asr_steps --model /tmp/asr_random.nemo --device cuda --batches $STEP_BATCHES \
    --cuda-graph-max-batch "$graph_max_batch" --json "$OUT/asr_steps.json" 2>&1 \
    | tee "$OUT/asr_steps.log" | grep --line-buffered -E '^\{|buckets ready|state for|Error|Traceback|Timeout' || true
fi
if [ -n "${LONG_MINUTES:-}" ]; then
  python3 -m bench.asr_long_stream --model /tmp/asr_random.nemo --device cuda --minutes "$LONG_MINUTES" \
    --json "$OUT/asr_long_stream.json" 2>&1 | tee "$OUT/asr_long_stream.log" \
    | grep --line-buffered -E '^\{|Error|Traceback|Timeout' || true
fi
python3 -m servers.asr --model /tmp/asr_random.nemo --port 8080 --device cuda --max-sessions "${MAX_SESSIONS:-2048}" \
  --cuda-graph-max-batch "$graph_max_batch" \
  > "$OUT/asr_server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
wait_healthy $server http://127.0.0.1:8080 "$OUT/asr_server.log"
python3 -m bench.asr_load --url ws://127.0.0.1:8080 --sessions ${SESSIONS:-1 64 256 512 768 1024 1280} \
  --duration "${DURATION:-20}" --frame-ms "${FRAME_MS:-160}" ${UNALIGNED:+--unaligned} --processes 8 --json "$OUT/asr_load.json"
