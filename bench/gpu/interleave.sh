#!/usr/bin/env bash
# Interleaved (scheduler) vs free-running ASR + TTS + LLM on one GPU (see docs/BENCHMARKS.md).
# Run from the repository root after bench/gpu/fetch_wheels.sh and
# ../shared/device/fetch_llama_sdist.sh filled ./.whl, e.g. through the device tool with
# carry=[".whl"]:  bash bench/gpu/interleave.sh
# Random-weight models of the released shapes; the LLM is a dense llama-architecture proxy
# with ~3 B parameters in f32 (the bytes read per token of Nemotron-3-Nano's ~3 B active
# parameters at Q8), since a random nemotron_h_moe GGUF cannot be written with our tools.
source bench/gpu/setup.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/llama-py/*.whl
CUDACXX=$(command -v nvcc) CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90-real -DLLAVA_BUILD=OFF \
  -DGGML_NATIVE=OFF -DGGML_CUDA_NCCL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip wheel -q --no-deps \
  --no-build-isolation --no-index -w /tmp/whl .whl/llama/llama_cpp_python-*-slim.tar.gz
python3 -m pip install -q --no-deps --target /tmp/site /tmp/whl/llama_cpp_python-*.whl
# torch and llama.cpp in one process need libstdc++ loaded globally first (device README).
export LD_PRELOAD=/lib/x86_64-linux-gnu/libstdc++.so.6
python3 -m bench.build_random_asr --out /tmp/asr_random.nemo 2>&1 | tail -n 2
python3 -m bench.build_random_tts --out /tmp/magpie_random 2>&1 | tail -n 2
python3 -m servers.llm.random_model /tmp/llm_proxy.gguf --n-embd 3072 --n-layer 28 --n-head 24 --n-head-kv 8 \
  --n-ff 8192 --init-std 0.02
python3 -m bench.interleave --asr /tmp/asr_random.nemo --tts /tmp/magpie_random/magpie.nemo \
  --llm /tmp/llm_proxy.gguf --device cuda --asr-streams "${ASR_STREAMS:-8}" --turns "${TURNS:-20}" \
  --json "$OUT/interleave.json" 2>&1 | tail -n 40
