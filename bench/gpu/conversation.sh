#!/usr/bin/env bash
# Voice-to-voice latency of the agent on one GPU, from the waveforms (see docs/BENCHMARKS.md).
# Run from the repository root after bench/gpu/fetch_wheels.sh filled ./.whl, e.g. through
# the device tool with carry=[".whl"]:  bash bench/gpu/conversation.sh
# The agent of bot.py runs on Pipecat's WebSocket transport and the scripted client speaks
# real speech to it, once per SERVERS entry, all with the same random-weight models:
# - host: the local GPU host (python -m scheduler), one process and one GPU scheduler;
# - standalone: the ASR, TTS and LLM servers as three processes sharing the GPU with no
#   coordination (free-running, each with its own interpreter: the fair baseline).
# The standalone servers get the host's sizes (16 ASR sessions, 16 TTS segments a step, graphs
# up to 16), so that the two differ only in coordination.
# ~10 min on an H100 (estimated): setup and the llama.cpp build ~5.5 min, then per entry
# ~1.5 min of loading and ~1 min of conversation (TURNS=6), near the device's 600 s a call.
# Each entry's results are in $OUT/<entry>/ (servers.log, agent.log, conversation.json) as
# soon as it ends, and an entry that fails does not stop the next: a call cut off keeps the
# entries it finished, and a second call at once with SERVERS=standalone (the warm machine
# keeps the build and the models in /tmp) adds the rest. Then bench/smart_turn.py prints
# Smart Turn's time by thread count.
for entry in ${SERVERS:-host standalone}; do
  case $entry in host | standalone) ;; *) echo "SERVERS entries are host or standalone, not $entry" >&2; exit 1 ;; esac
done
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
      python3 -m servers.asr --device cuda --model /tmp/asr_random.nemo --port 8080 \
        --max-sessions 16 --cuda-graph-max-batch 16 >> "$2" 2>&1 &
      servers=($!)
      python3 -m servers.tts --device cuda --model /tmp/magpie_random/magpie.nemo --port 8001 \
        --max-frames-per-token $TTS_CAP --max-batch 16 --cuda-graph-max-batch 16 >> "$2" 2>&1 &
      servers+=($!)
      python3 -m servers.llm --model "$LLM_GGUF" --port 8082 >> "$2" 2>&1 &
      servers+=($!) ;;
  esac
  local ports=(8080 8001 8082)
  for i in 0 1 2; do wait_healthy "${servers[$i]}" "http://127.0.0.1:${ports[$i]}" "$2" || return 1; done
}

stop() {  # PIDs: SIGTERM (a graceful stop), then SIGKILL for any still there after 30 s
  [ $# -gt 0 ] || return 0
  kill "$@" 2>/dev/null || true
  for _ in $(seq 60); do
    kill -0 "$@" 2>/dev/null || break
    sleep 0.5
  done
  kill -9 "$@" 2>/dev/null || true
  wait "$@" 2>/dev/null || true
}

converse() {  # $1: entry; its files in $2
  start_servers "$1" "$2/servers.log" || return 1
  NVIDIA_ASR_URL=ws://127.0.0.1:8080 NVIDIA_TTS_URL=ws://127.0.0.1:8001 NVIDIA_LLM_URL=http://127.0.0.1:8082/v1 \
    BOT_GREETING=false BOT_MAX_TOKENS="${MAX_TOKENS:-24}" PYTHONPATH=$agent_path \
    python3 -m bench.conversation --serve 8765 > "$2/agent.log" 2>&1 &
  agent=$!
  python3 -c 'import socket, time
for _ in range(600):
    try: socket.create_connection(("127.0.0.1", 8765), 1).close(); break
    except OSError: time.sleep(0.1)'
  kill -0 $agent 2>/dev/null || { echo "the agent exited:"; tail -n 40 "$2/agent.log"; return 1; }
  PYTHONPATH=$agent_path python3 -m bench.conversation --url ws://127.0.0.1:8765 --turns "${TURNS:-6}" \
    --barge-in-every 4 --json "$2/conversation.json" || return 1
  grep -a "voice-to-voice" "$2/agent.log" | tail -n "${TURNS:-6}" || true
}

failed=0
for entry in ${SERVERS:-host standalone}; do
  mkdir -p "$OUT/$entry"
  echo "== $entry"
  converse "$entry" "$OUT/$entry" || { echo "== $entry failed"; failed=$((failed + 1)); }
  stop ${agent:-} "${servers[@]}"
  agent=
  servers=()
done
# Smart Turn's CPU time by thread count on this machine's cores (printed: $OUT holds 8 files).
PYTHONPATH=$agent_path python3 -m bench.smart_turn --cpus 1 2 4 8 --turns 20
if [ $failed -gt 0 ]; then
  echo "$failed of the entries failed" >&2
  exit 1
fi
