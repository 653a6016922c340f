"""The local GPU host: ASR, TTS and LLM endpoints at once, on one scheduler (CPU, tiny models)."""

import asyncio
import time

import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import connect

from scheduler.policy import Unit
from tests.asr.client import server_url, transcribe_over_ws
from tests.asr.helpers import make_engine as make_asr_engine
from tests.asr.helpers import offline_text
from tests.llm.helpers import SYSTEM
from tests.llm.helpers import make_engine as make_llm_engine
from tests.llm.helpers import run as run_llm
from tests.tts.client import audio_of, is_done, recv_message, send, until

pytestmark = pytest.mark.slow

QUESTION = [SYSTEM, {"role": "user", "content": "hello world, what is the weather?"}]


def llm_client(gpu_host) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{gpu_host.llm.port}/v1", api_key="none")


async def stream_llm(gpu_host, max_tokens: int) -> str:
    chunks = await llm_client(gpu_host).chat.completions.create(
        model="m", messages=QUESTION, max_tokens=max_tokens, temperature=0, stream=True
    )
    return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])


async def speak(gpu_host, text: str) -> list:
    async with connect(server_url(gpu_host.tts)) as ws:
        await recv_message(ws)
        await send(ws, type="speak", context_id="turn", text=text)
        await send(ws, type="flush", context_id="turn")
        return await until(ws, is_done("turn"))


async def test_asr_llm_and_tts_at_once_give_what_each_gives_alone(gpu_host, tiny_asr_path, tiny_llm_path, speech_int16):
    utterance = speech_int16[16000 : 16000 * 4]
    asr, llm, tts = await asyncio.gather(
        transcribe_over_ws(server_url(gpu_host.asr), utterance, realtime=True),
        stream_llm(gpu_host, max_tokens=48),
        speak(gpu_host, "Hello there, how are you today?"),
    )
    assert asr[-1].text == offline_text(make_asr_engine(tiny_asr_path), utterance, padding_ms=120)
    assert llm == run_llm(make_llm_engine(tiny_llm_path), _request(48))[0]
    assert len(audio_of(tts, "turn")) > 0
    units = list(gpu_host.scheduler.history)
    assert {Unit.ASR, Unit.LLM_FIRST, Unit.LLM, Unit.TTS_FIRST} <= {u.unit for u in units}
    for earlier, later in zip(units, units[1:]):
        assert earlier.started + earlier.seconds <= later.started, "units never overlap"
    assert next(u.unit for u in units if u.unit.model == "llm") is Unit.LLM_FIRST


async def test_asr_never_waits_more_than_one_unit(gpu_host, speech_int16):
    await asyncio.gather(
        transcribe_over_ws(server_url(gpu_host.asr), speech_int16[16000 : 16000 * 4], realtime=True),
        stream_llm(gpu_host, max_tokens=200),
        speak(gpu_host, "A sentence long enough to keep the speech model busy for a while."),
    )
    units = [u.unit for u in gpu_host.scheduler.history]
    assert Unit.ASR in units
    # The scheduler's own count of units run while ASR was ready never exceeded one.
    assert gpu_host.scheduler.max_asr_wait_units <= 1


async def test_cancel_stops_llm_and_tts_work_within_one_unit(gpu_host):
    async with connect(server_url(gpu_host.tts)) as ws:
        await recv_message(ws)
        await send(ws, type="speak", context_id="turn", text="A rather long sentence that takes a good while to say.")
        await until(ws, lambda m: m.type == "audio")
        chunks = await llm_client(gpu_host).chat.completions.create(
            model="m", messages=QUESTION, max_tokens=900, temperature=0, stream=True
        )
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        llm_cancelled_at = time.monotonic()
        await chunks.close()
        tts_cancelled_at = time.monotonic()
        await send(ws, type="cancel", context_id="turn")
        await until(ws, lambda m: m.type == "cancelled")
    await asyncio.sleep(0.3)
    units = list(gpu_host.scheduler.history)
    assert len([u for u in units if u.unit.model == "llm" and u.started > llm_cancelled_at]) <= 1
    assert len([u for u in units if u.unit.model == "tts" and u.started > tts_cancelled_at]) <= 1
    assert not gpu_host.llm.engine.has_work() and not gpu_host.tts.engine.has_work()


def _request(max_tokens: int):
    from servers.llm.engine import ChatRequest

    return ChatRequest(QUESTION, max_tokens=max_tokens)
