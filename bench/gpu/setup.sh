# Sourced by the GPU benchmark scripts: installs the carried wheels (see fetch_wheels.sh),
# prints the machine, and defines wait_healthy PID URL [LOG] and build_whole FINAL PART
# COMMAND... (below).
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl/bench/*.whl .whl/tts/*.whl
python3 -c 'import pydantic' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/opt/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' | tee -a "$OUT/gpu.txt"
# A machine where torch sees no GPU would skip the GPU tests and time the CPU: stop here.
python3 -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"'

# wait_healthy PID URL [LOG]: wait until the server process PID answers "ready" at URL/health.
# Fails (non-zero, so set -e ends the runner and its EXIT trap) as soon as PID is gone, e.g.
# a server that died while loading, or after HEALTH_TIMEOUT_S (300) seconds, printing the
# tail of LOG (the server's output) either way: a dead server must not eat the device
# call's 600 s.
wait_healthy() {
  python3 - "$1" "$2" "${3:-}" "${HEALTH_TIMEOUT_S:-300}" <<'PY'
import http.client, json, os, sys, time, urllib.request

pid, url, log, limit = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])


def alive() -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # exited but not yet reaped by the shell
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def fail(why: str) -> None:
    if log and os.path.exists(log):
        with open(log, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()[-40:]
        print(f"--- last {len(lines)} lines of {log}", *lines, sep="\n", file=sys.stderr)
    raise SystemExit(f"wait_healthy: {url} {why}")


started = time.monotonic()
while True:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            report = json.load(r)
            if report["status"] == "ready":
                break
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        pass
    if not alive():
        fail(f"server process {pid} exited after {time.monotonic() - started:.0f} s, before it was ready")
    if time.monotonic() - started > limit:
        fail(f"not ready after {limit:.0f} s")
    time.sleep(0.5)
graphs = f"; CUDA graphs {report['cuda_graphs']}" if "cuda_graphs" in report else ""  # 0: a part runs eagerly
print(f"{url} ready after {time.monotonic() - started:.0f} s{graphs}", file=sys.stderr)
PY
}

# build_whole FINAL PART COMMAND...: run COMMAND, which writes PART (a file or a directory),
# showing the end of its output; then PART becomes FINAL. A call killed mid-write (the
# device's 600 s) leaves no FINAL that a later call would take for a whole model.
build_whole() {
  local final=$1 part=$2
  shift 2
  rm -rf "$part"
  "$@" 2>&1 | tail -n 2
  rm -rf "$final"
  mv "$part" "$final"
}
