# Sourced by the GPU benchmark scripts: installs the carried wheels (see fetch_wheels.sh),
# prints the machine, and defines wait_healthy URL.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl/bench/*.whl .whl/tts/*.whl
python3 -c 'import pydantic' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/opt/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' | tee -a "$OUT/gpu.txt"

wait_healthy() {
  python3 - "$1" <<'PY'
import json, sys, time, urllib.request
for _ in range(1200):
    try:
        with urllib.request.urlopen(sys.argv[1] + "/health", timeout=2) as r:
            if json.load(r)["status"] == "ready":
                break
    except OSError:
        pass
    time.sleep(0.5)
else:
    raise SystemExit(f"{sys.argv[1]} never became ready")
PY
}
