#!/usr/bin/env bash
# Sourced after setup.sh by the runners that need all three models: builds llama.cpp with
# CUDA (bench/gpu/llama.sh, ~280 s) in the background while it writes random-weight
# models of the released ASR and TTS shapes and the LLM proxy (models already under /tmp
# are reused). The LLM proxy (LLM_PROXY, path in $LLM_GGUF):
# - nano (default): servers.llm.random_model's NEMOTRON_3_NANO_PROXY, Nemotron-3-Nano's own
#   architecture (nemotron_h_moe: Mamba-2, attention and MoE layers in its pattern, its
#   widths and 131k vocabulary) with 8 routed experts instead of 128, in Q8_0: the ~3.2 B
#   parameters a token reads, a 4.3 GB file (~20 s to write), and llama.cpp's hybrid
#   memory, so the engine takes state snapshots as it will for the real model;
# - dense: the proxy of the 2026-11-22 runs, a llama-architecture model of ~3 B parameters
#   in f32 with a tiny vocabulary.
# Each model is written under a temporary name and moved into place when whole, so a call
# killed mid-write (the device's 600 s) leaves nothing the next call would take for a model.
(source bench/gpu/llama.sh) > "$OUT/llama_build.log" 2>&1 &
llama_build=$!
if [ ! -f /tmp/asr_random.nemo ]; then
  build_whole /tmp/asr_random.nemo /tmp/asr_random.part.nemo \
    python3 -m bench.build_random_asr --out /tmp/asr_random.part.nemo
fi
if [ ! -f /tmp/magpie_random/magpie.nemo ]; then
  # --out is a directory (magpie.nemo and codec.nemo). The codec path stored in magpie.nemo
  # then names the temporary one, and the TTS loader falls back to the codec.nemo beside
  # the checkpoint (servers/tts/model.py).
  build_whole /tmp/magpie_random /tmp/magpie_random.part python3 -m bench.build_random_tts --out /tmp/magpie_random.part
fi
LLM_GGUF=/tmp/llm_proxy_${LLM_PROXY:-nano}.gguf
case "${LLM_PROXY:-nano}" in
  nano) llm_shape=(--nemotron-h nano-proxy) ;;
  dense) llm_shape=(--n-embd 3072 --n-layer 28 --n-head 24 --n-head-kv 8 --n-ff 8192) ;;
  *) echo "LLM_PROXY must be nano or dense" >&2; exit 1 ;;
esac
if [ ! -f "$LLM_GGUF" ]; then
  build_whole "$LLM_GGUF" "$LLM_GGUF.part" \
    python3 -m servers.llm.random_model "$LLM_GGUF.part" "${llm_shape[@]}" --init-std 0.02
fi
wait "$llama_build" || { tail -n 30 "$OUT/llama_build.log"; exit 1; }
