#!/usr/bin/env bash
# Interleaved (scheduler) vs free-running ASR + TTS + LLM on one GPU (see docs/BENCHMARKS.md).
# Run from the repository root after bench/gpu/fetch_wheels.sh filled ./.whl, e.g. through
# the device tool with carry=[".whl"]:  bash bench/gpu/interleave.sh   (~8 min on an H100)
source bench/gpu/setup.sh
source bench/gpu/host_models.sh
python3 -m bench.interleave --asr /tmp/asr_random.nemo --tts /tmp/magpie_random/magpie.nemo \
  --llm /tmp/llm_proxy.gguf --device cuda --asr-streams "${ASR_STREAMS:-8}" --turns "${TURNS:-8}" --max-tokens "${MAX_TOKENS:-40}" \
  --modes ${MODES:-free scheduled scheduled-no-holds} --json "$OUT/interleave.json" 2>&1 | tee "$OUT/interleave.log" | tail -n 40
