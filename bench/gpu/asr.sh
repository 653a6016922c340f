#!/usr/bin/env bash
# The ASR benchmark on a GPU machine (see docs/BENCHMARKS.md). Run from the repository root
# after bench/gpu/fetch_wheels.sh filled ./.whl, e.g. through the device tool with carry=[".whl"]:
#   bash bench/gpu/asr.sh
# Builds a random-weight model of the released shape, serves it, and sweeps concurrent
# real-time sessions. Results land in $OUT (default /tmp/out).
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl/bench/*.whl
python3 -c 'import pydantic' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/opt/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' | tee -a "$OUT/gpu.txt"

python3 -m bench.build_random_asr --out /tmp/asr_full.nemo 2>&1 | tail -n 3
python3 -m servers.asr --model /tmp/asr_full.nemo --port 8080 --device cuda --max-sessions "${MAX_SESSIONS:-2048}" \
  --log-level INFO > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
python3 - <<'PY'
import json, time, urllib.request
for _ in range(600):
    try:
        with urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=2) as r:
            if json.load(r)["status"] == "ready":
                break
    except OSError:
        pass
    time.sleep(0.5)
else:
    raise SystemExit("ASR server never became ready")
PY
python3 -m bench.asr_load --url ws://127.0.0.1:8080 --sessions ${SESSIONS:-1 64 256 512 768 1024 1280} \
  --duration "${DURATION:-20}" --processes 8 --json "$OUT/asr_load.json"
