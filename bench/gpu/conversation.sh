#!/usr/bin/env bash
# Voice-to-voice latency of the agent on one GPU, from the waveforms (see docs/BENCHMARKS.md).
# Run from the repository root after bench/gpu/fetch_wheels.sh filled ./.whl, e.g. through
# the device tool with carry=[".whl"]:  bash bench/gpu/conversation.sh
# The local GPU host (python -m scheduler) serves random-weight models; the agent of bot.py
# runs on Pipecat's WebSocket transport; the scripted client speaks real speech to it.
source bench/gpu/setup.sh
# The agent's packages go beside the servers', not over them: its protobuf 6 would shadow the
# image's protobuf 7 for NeMo's dependencies in the host process.
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/agent-site .whl/agent/*.whl
agent_path=/tmp/agent-site:$PYTHONPATH
source bench/gpu/host_models.sh
python3 -m scheduler --device cuda --asr-model /tmp/asr_random.nemo --tts-model /tmp/magpie_random/magpie.nemo \
  --llm-model "$LLM_GGUF" --tts-max-frames-per-token 1.5 > "$OUT/host.log" 2>&1 &
host=$!
trap 'kill $host ${agent:-} 2>/dev/null || true' EXIT
for port in 8080 8001 8082; do wait_healthy $host "http://127.0.0.1:$port" "$OUT/host.log"; done
NVIDIA_ASR_URL=ws://127.0.0.1:8080 NVIDIA_TTS_URL=ws://127.0.0.1:8001 NVIDIA_LLM_URL=http://127.0.0.1:8082/v1 \
  BOT_GREETING=false BOT_MAX_TOKENS="${MAX_TOKENS:-24}" PYTHONPATH=$agent_path \
  python3 -m bench.conversation --serve 8765 > "$OUT/agent.log" 2>&1 &
agent=$!
python3 -c 'import socket, time
for _ in range(600):
    try: socket.create_connection(("127.0.0.1", 8765), 1).close(); break
    except OSError: time.sleep(0.1)'
kill -0 $agent 2>/dev/null || { echo "the agent exited:"; tail -n 40 "$OUT/agent.log"; exit 1; }
PYTHONPATH=$agent_path python3 -m bench.conversation --url ws://127.0.0.1:8765 --turns "${TURNS:-8}" --barge-in-every 4 \
  --json "$OUT/conversation.json"
grep -a "voice-to-voice" "$OUT/agent.log" | tail -n "${TURNS:-8}"
