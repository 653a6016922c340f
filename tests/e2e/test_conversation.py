"""The whole voice agent on CPU: real VAD and Smart Turn, real speech in, tiny models.

The models' output is noise; the plumbing is real: Pipecat's WebSocket transport, the
agent's pipeline, and the local GPU host's three endpoints on one scheduler.
"""

import asyncio
import socket

import pytest
from pipecat.workers.runner import WorkerRunner

from bench.conversation import Turn, agent_transport, converse, measure, sentences
from pipecat_nvidia.agent import AgentSettings, build_agent

pytestmark = pytest.mark.slow

ANSWER_PAUSE_S = 8.0
BARGE_IN_PAUSE_S = 2.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_listening(port: int) -> None:
    """A bare TCP connection: a WebSocket one would count as the transport's one client."""
    for _ in range(200):
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture(scope="module")
async def conversation(gpu_host, speech_int16):
    """Three answered turns, then a turn the user cuts off by speaking again."""
    settings = AgentSettings(
        asr_url=f"ws://127.0.0.1:{gpu_host.asr.port}",
        tts_url=f"ws://127.0.0.1:{gpu_host.tts.port}",
        llm_url=f"http://127.0.0.1:{gpu_host.llm.port}/v1",
        max_tokens=12,
        greeting=False,
    )
    port = free_port()
    agent = build_agent(agent_transport(port), settings)
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(agent.worker)
    running = asyncio.create_task(runner.run())
    await wait_listening(port)
    utterances = sentences(speech_int16)[:4]
    pauses = [ANSWER_PAUSE_S, ANSWER_PAUSE_S, BARGE_IN_PAUSE_S, ANSWER_PAUSE_S]
    recording = await converse(f"ws://127.0.0.1:{port}", [Turn(u, p) for u, p in zip(utterances, pauses)])
    await asyncio.wait_for(running, 30)
    return agent, recording


async def test_every_turn_is_transcribed_answered_and_spoken(conversation):
    agent, recording = conversation
    roles = [m["role"] for m in agent.context.messages]
    assert roles.count("user") >= 4 and roles.count("assistant") >= 4
    assert all(m["content"].strip() for m in agent.context.messages if m["role"] == "user")
    assert len(measure(recording).response_s) >= 3


async def test_a_barge_in_stops_the_bot_audio(conversation):
    _, recording = conversation
    stops = measure(recording).barge_in_stop_s
    assert len(stops) == 1 and stops[0] < 1.0


async def test_each_turn_logs_where_its_latency_went(conversation):
    agent, _ = conversation
    assert len(agent.latency.turns) >= 3
    for turn in agent.latency.turns:
        assert 0 < turn.voice_to_voice_s < 10
        owners = {p.label: p.owner for p in turn.parts}
        assert owners["transcription"].startswith("NemotronSTTService"), turn.line()
        assert owners["LLM inference"].startswith("NemotronLLMService"), turn.line()
        assert owners["speech synthesis"].startswith("MagpieTTSService"), turn.line()
        assert sum(p.seconds for p in turn.parts) == pytest.approx(turn.voice_to_voice_s, abs=0.01), turn.line()


async def test_nothing_is_left_running_afterwards(conversation, gpu_host):
    await asyncio.sleep(0.5)
    assert gpu_host.asr.engine.session_count == 0 and gpu_host.tts.engine.session_count == 0
    assert not gpu_host.llm.engine.has_work() and not gpu_host.tts.engine.has_work()
