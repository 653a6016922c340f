#!/usr/bin/env bash
# Interleaved (scheduler) vs free-running ASR + TTS + LLM on one GPU (see docs/BENCHMARKS.md).
# Run from the repository root after bench/gpu/fetch_wheels.sh filled ./.whl, e.g. through
# the device tool with carry=[".whl"]:  bash bench/gpu/interleave.sh
# ~9 min on an H100 with the three default MODES (estimated from the ~8 min two-mode run of
# 2026-11-22): setup and the llama.cpp build (~280 s, the
# models written beside it) ~5.5 min, loading the three engines ~1.5 min, then ~40 s per mode
# (--idle-s 10.5, a warm-up turn and 8 turns). MODES="free scheduled" saves ~40 s. $OUT/interleave.json is
# rewritten after every mode (a mode that fails gets its "error" and the next one runs), so a
# call cut off at 600 s keeps the modes it finished.
source bench/gpu/setup.sh
source bench/gpu/host_models.sh
python3 -m bench.interleave --asr /tmp/asr_random.nemo --tts /tmp/magpie_random/magpie.nemo \
  --llm "$LLM_GGUF" --device cuda --asr-streams "${ASR_STREAMS:-8}" --turns "${TURNS:-8}" --max-tokens "${MAX_TOKENS:-40}" \
  --modes ${MODES:-free scheduled scheduled-no-holds} --json "$OUT/interleave.json" 2>&1 | tee "$OUT/interleave.log" | tail -n 40
