#!/usr/bin/env bash
# Interleaved (scheduler) vs free-running ASR + TTS + LLM on one GPU (see docs/BENCHMARKS.md).
# Run from the repository root after bench/gpu/fetch_wheels.sh and
# ../shared/device/fetch_llama_sdist.sh filled ./.whl, e.g. through the device tool with
# carry=[".whl"]:  bash bench/gpu/interleave.sh
# Random-weight models of the released shapes; the LLM is a dense llama-architecture proxy
# with ~3 B parameters in f32 (the bytes read per token of Nemotron-3-Nano's ~3 B active
# parameters at Q8), since a random nemotron_h_moe GGUF cannot be written with our tools.
# Models already under /tmp (e.g. written while llama.cpp built) are reused.
source bench/gpu/setup.sh
source bench/gpu/llama.sh
[ -f /tmp/asr_random.nemo ] || python3 -m bench.build_random_asr --out /tmp/asr_random.nemo 2>&1 | tail -n 2
[ -f /tmp/magpie_random/magpie.nemo ] || python3 -m bench.build_random_tts --out /tmp/magpie_random 2>&1 | tail -n 2
[ -f /tmp/llm_proxy.gguf ] || python3 -m servers.llm.random_model /tmp/llm_proxy.gguf --n-embd 3072 --n-layer 28 \
  --n-head 24 --n-head-kv 8 --n-ff 8192 --init-std 0.02
python3 -m bench.interleave --asr /tmp/asr_random.nemo --tts /tmp/magpie_random/magpie.nemo \
  --llm /tmp/llm_proxy.gguf --device cuda --asr-streams "${ASR_STREAMS:-8}" --turns "${TURNS:-8}" --max-tokens "${MAX_TOKENS:-40}" \
  --json "$OUT/interleave.json" 2>&1 | tee "$OUT/interleave.log" | tail -n 40
