#!/usr/bin/env bash
# Run here, from the repository root, before a GPU benchmark: fills ./.whl (git-ignored via
# .git/info/exclude) with the NeMo wheels the GPU image lacks (the shared recipe) plus what
# our servers need beyond them. The GPU machine reaches no package registry.
set -euo pipefail
shared=${SHARED_DIR:-../shared}
"$shared/device/fetch_nemo_wheels.sh"
mkdir -p .whl/bench
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d .whl/bench websockets==17.4 loguru==0.7.3
ls .whl/bench
