#!/usr/bin/env bash
# Sourced by GPU benchmark scripts after setup.sh: builds llama-cpp-python with CUDA from
# the carried sdist (~280 s on 16 cores; skipped when /tmp/whl already holds the wheel, so
# it can run in the background while models are written) and installs it.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/llama-py/*.whl
if ! ls /tmp/whl/llama_cpp_python-*.whl >/dev/null 2>&1; then
  CUDACXX=$(command -v nvcc) CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90-real -DLLAVA_BUILD=OFF \
    -DGGML_NATIVE=OFF -DGGML_CUDA_NCCL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip wheel -q --no-deps \
    --no-build-isolation --no-index -w /tmp/whl .whl/llama/llama_cpp_python-*-slim.tar.gz
fi
python3 -m pip install -q --no-deps --upgrade --target /tmp/site /tmp/whl/llama_cpp_python-*.whl
