#!/usr/bin/env bash
# Sourced after setup.sh by the runners that need all three models: builds llama.cpp with
# CUDA (bench/gpu/llama.sh, ~280 s) in the background while it writes random-weight
# models of the released ASR and TTS shapes and the LLM proxy (models already under /tmp
# are reused). The proxy is a dense llama-architecture model of ~3 B parameters in f32:
# about the bytes read per token of Nemotron-3-Nano's ~3 B active parameters at Q8, since a
# random nemotron_h_moe GGUF cannot be written with our tools.
# Each model is written under a temporary name and moved into place when whole, so a call
# killed mid-write (the device's 600 s) leaves nothing the next call would take for a model.
(source bench/gpu/llama.sh) > "$OUT/llama_build.log" 2>&1 &
llama_build=$!
if [ ! -f /tmp/asr_random.nemo ]; then
  python3 -m bench.build_random_asr --out /tmp/asr_random.part.nemo 2>&1 | tail -n 1
  mv -f /tmp/asr_random.part.nemo /tmp/asr_random.nemo
fi
if [ ! -f /tmp/magpie_random/magpie.nemo ]; then
  # --out is a directory (magpie.nemo and codec.nemo): build the whole directory aside. The
  # codec path stored in magpie.nemo then names the temporary one, and the TTS loader falls
  # back to the codec.nemo beside the checkpoint (servers/tts/model.py).
  rm -rf /tmp/magpie_random.part
  python3 -m bench.build_random_tts --out /tmp/magpie_random.part 2>&1 | tail -n 1
  rm -rf /tmp/magpie_random
  mv /tmp/magpie_random.part /tmp/magpie_random
fi
if [ ! -f /tmp/llm_proxy.gguf ]; then
  python3 -m servers.llm.random_model /tmp/llm_proxy.part.gguf --n-embd 3072 --n-layer 28 \
    --n-head 24 --n-head-kv 8 --n-ff 8192 --init-std 0.02
  mv -f /tmp/llm_proxy.part.gguf /tmp/llm_proxy.gguf
fi
wait "$llama_build" || { tail -n 30 "$OUT/llama_build.log"; exit 1; }
