#!/usr/bin/env bash
# Run here, from the repository root, before a GPU benchmark: fills ./.whl (git-ignored: this
# adds /.whl/ to .git/info/exclude) with the NeMo wheels the GPU image lacks (the shared
# recipe) plus what our servers and the agent need beyond them (~60 MB in all, under the
# device tool's 64 MiB carry). The GPU machine (x86_64, Python 3.12) reaches no package
# registry; binary wheels are asked for by its platform, so an aarch64 workstation fetches them too.
set -euo pipefail
shared=${SHARED_DIR:-../shared}
# Keep ./.whl out of git status (and out of the other engineers' `git add -A`) in this checkout only.
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
"$shared/device/fetch_nemo_wheels.sh"
"$shared/device/fetch_llama_sdist.sh"   # llama-cpp-python, built with CUDA on the GPU machine
mkdir -p .whl/bench
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl/bench websockets==17.4 loguru==0.7.3
ls .whl/bench
# The agent (bench/gpu/conversation.sh): Pipecat and what it needs beyond the image.
mkdir -p .whl/agent
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/agent \
  pipecat-ai==1.14.0 openai==3.54.0 jiter==0.19.0 sniffio==1.3.1 docstring-parser==0.18.0 loudness==0.2.0 \
  num2words==0.5.14 resampy==0.4.3 sentencex==1.0.32 wait-for2==0.4.1 python-dotenv==1.2.4 httpx2==2.16.2 \
  httpcore2==2.16.2 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0 truststore==0.10.5 protobuf==6.33.6
python3 -m pip wheel -q --no-deps -w .whl/agent docopt==0.6.2   # sdist only on PyPI; pure Python
ls .whl/agent
# The tests that need a GPU (bench/gpu/gpu_tests.sh): pytest and the plugins pyproject.toml names.
mkdir -p .whl/test
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl/test \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-asyncio==1.5.0 pytest-timeout==2.4.0
ls .whl/test
