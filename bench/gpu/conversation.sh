#!/usr/bin/env bash
# Voice-to-voice latency of the agent on one GPU, from the waveforms (see docs/BENCHMARKS.md).
# Run from the repository root after bench/gpu/fetch_wheels.sh filled ./.whl, e.g. through
# the device tool with carry=[".whl"]:  bash bench/gpu/conversation.sh
# The agent of bot.py runs on Pipecat's WebSocket transport and the scripted client speaks
# real speech to it, once per SERVERS entry, all with the same random-weight models:
# - host: the local GPU host (python -m scheduler), one process and one GPU scheduler;
# - standalone: the ASR, TTS and LLM servers as three processes sharing the GPU with no
#   coordination (free-running, each with its own interpreter: the fair baseline).
# ~10 min on an H100 (estimated): setup and the llama.cpp build ~5.5 min, then per entry
# ~1.5 min of loading and ~1 min of conversation. Each entry's results are in $OUT/<entry>/
# (servers.log, agent.log, conversation.json) as soon as it ends, so a call cut off at 600 s
# keeps the entries it finished. Then bench/smart_turn.py prints Smart Turn's time by thread count.
source bench/gpu/setup.sh
# The agent's packages go beside the servers', not over them: its protobuf 6 would shadow the
# image's protobuf 7 for NeMo's dependencies in the servers' processes.
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/agent-site .whl/agent/*.whl
agent_path=/tmp/agent-site:$PYTHONPATH
source bench/gpu/host_models.sh
TTS_CAP=1.5
servers=()
trap 'kill "${servers[@]}" ${agent:-} 2>/dev/null || true' EXIT

start_servers() {  # $1: host | standalone; output to $2
  case $1 in
    host)
      python3 -m scheduler --device cuda --asr-model /tmp/asr_random.nemo --tts-model /tmp/magpie_random/magpie.nemo \
        --llm-model "$LLM_GGUF" --tts-max-frames-per-token $TTS_CAP >> "$2" 2>&1 &
      servers=($! $! $!) ;;
    standalone)
      python3 -m servers.asr --device cuda --model /tmp/asr_random.nemo --port 8080 >> "$2" 2>&1 &
      servers=($!)
      python3 -m servers.tts --device cuda --model /tmp/magpie_random/magpie.nemo --port 8001 \
        --max-frames-per-token $TTS_CAP >> "$2" 2>&1 &
      servers+=($!)
      python3 -m servers.llm --model "$LLM_GGUF" --port 8082 >> "$2" 2>&1 &
      servers+=($!) ;;
    *) echo "SERVERS entries are host or standalone" >&2; exit 1 ;;
  esac
  local ports=(8080 8001 8082)
  for i in 0 1 2; do wait_healthy "${servers[$i]}" "http://127.0.0.1:${ports[$i]}" "$2"; done
}

for entry in ${SERVERS:-host standalone}; do
  dir=$OUT/$entry
  mkdir -p "$dir"
  start_servers "$entry" "$dir/servers.log"
  NVIDIA_ASR_URL=ws://127.0.0.1:8080 NVIDIA_TTS_URL=ws://127.0.0.1:8001 NVIDIA_LLM_URL=http://127.0.0.1:8082/v1 \
    BOT_GREETING=false BOT_MAX_TOKENS="${MAX_TOKENS:-24}" PYTHONPATH=$agent_path \
    python3 -m bench.conversation --serve 8765 > "$dir/agent.log" 2>&1 &
  agent=$!
  python3 -c 'import socket, time
for _ in range(600):
    try: socket.create_connection(("127.0.0.1", 8765), 1).close(); break
    except OSError: time.sleep(0.1)'
  kill -0 $agent 2>/dev/null || { echo "the agent exited:"; tail -n 40 "$dir/agent.log"; exit 1; }
  echo "== $entry"
  PYTHONPATH=$agent_path python3 -m bench.conversation --url ws://127.0.0.1:8765 --turns "${TURNS:-8}" \
    --barge-in-every 4 --json "$dir/conversation.json"
  grep -a "voice-to-voice" "$dir/agent.log" | tail -n "${TURNS:-8}"
  kill $agent "${servers[@]}" 2>/dev/null || true
  wait $agent "${servers[@]}" 2>/dev/null || true
  agent=
done
# Smart Turn's CPU time by thread count on this machine's cores (printed: $OUT holds 8 files).
PYTHONPATH=$agent_path python3 -m bench.smart_turn --cpus 1 2 4 8 --turns 20
