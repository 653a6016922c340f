#!/usr/bin/env bash
# Sourced after setup.sh by the runners that need all three models: builds llama.cpp with
# CUDA (bench/gpu/llama.sh, ~280 s) in the background while it writes random-weight
# models of the released ASR and TTS shapes and the LLM proxy (models already under /tmp
# are reused). The proxy is a dense llama-architecture model of ~3 B parameters in f32:
# about the bytes read per token of Nemotron-3-Nano's ~3 B active parameters at Q8, since a
# random nemotron_h_moe GGUF cannot be written with our tools.
(source bench/gpu/llama.sh) > "$OUT/llama_build.log" 2>&1 &
llama_build=$!
[ -f /tmp/asr_random.nemo ] || python3 -m bench.build_random_asr --out /tmp/asr_random.nemo 2>&1 | tail -n 1
[ -f /tmp/magpie_random/magpie.nemo ] || python3 -m bench.build_random_tts --out /tmp/magpie_random 2>&1 | tail -n 1
[ -f /tmp/llm_proxy.gguf ] || python3 -m servers.llm.random_model /tmp/llm_proxy.gguf --n-embd 3072 --n-layer 28 \
  --n-head 24 --n-head-kv 8 --n-ff 8192 --init-std 0.02
wait "$llama_build" || { tail -n 30 "$OUT/llama_build.log"; exit 1; }
