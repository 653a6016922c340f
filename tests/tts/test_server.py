"""The TTS WebSocket server on loopback with a tiny (greedy) model."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest
from websockets.asyncio.client import connect

from pipecat_nvidia.protocol import ErrorCode
from tests.asr.client import http_get, server_url
from tests.tts.client import audio_of, is_done, recv_message, send, until

TEXT = "Good morning to you."


@pytest.fixture(scope="module")
def alone(tiny_tts_path):
    """The audio the engine makes of a text on its own (greedy, so always the same)."""
    from tests.tts.helpers import make_tts_engine, pcm, synthesize

    engine = make_tts_engine(tiny_tts_path)
    return lambda text, **speak: pcm(synthesize(engine, text, **speak))


async def _speak_and_wait(url, context_id, text, **speak):
    async with connect(url) as ws:
        await recv_message(ws)
        await send(ws, type="speak", context_id=context_id, text=text, **speak)
        await send(ws, type="flush", context_id=context_id)
        return await until(ws, is_done(context_id))


async def test_ready_lists_voices_languages_and_presets(start_tts_server):
    server = await start_tts_server()
    async with connect(server_url(server)) as ws:
        ready = await recv_message(ws)
    assert ready.type == "ready"
    assert (ready.voices, ready.languages, ready.sample_rate) == (["0", "1"], ["en"], 22050)
    assert ready.default_preset in ready.presets and ready.frame_ms == pytest.approx(1024 / 22.05)


async def test_a_streamed_segment_arrives_in_chunks_then_segment_done_then_done(start_tts_server, alone):
    server = await start_tts_server()
    messages = await _speak_and_wait(server_url(server), "turn-1", TEXT, mode="stream")
    kinds = [m.type for m in messages]
    assert kinds[-2:] == ["segment_done", "done"] and kinds.count("audio") > 3
    assert np.abs(audio_of(messages).astype(int) - alone(TEXT)).max() <= 1
    assert messages[-2].audio_ms == pytest.approx(len(audio_of(messages)) / 22.05, abs=1)


async def test_concurrent_clients_each_get_only_their_own_audio(start_tts_server, alone):
    server = await start_tts_server()
    texts = ["Good morning to you.", "The weather is fine.", "See you later, alligator."]
    results = await asyncio.gather(*(_speak_and_wait(server_url(server), "t", t) for t in texts))
    for text, messages in zip(texts, results):
        assert np.abs(audio_of(messages).astype(int) - alone(text)).max() <= 1
    status, body = await asyncio.to_thread(http_get, server_url(server, "/metrics", "http"))
    batches = [line for line in body.decode().splitlines() if line.startswith("tts_batch_size_bucket")]
    assert any(line.startswith('tts_batch_size_bucket{le="2.0"}') for line in batches)
    largest = {line.split('"')[1]: float(line.split()[-1]) for line in batches}
    assert largest["+Inf"] > largest["2.0"], "some steps carried all three segments"


async def test_cancel_stops_a_turn_and_nothing_of_it_follows_cancelled(start_tts_server):
    server = await start_tts_server()
    async with connect(server_url(server)) as ws:
        await recv_message(ws)
        await send(ws, type="speak", context_id="turn", text="A rather long sentence that takes a while to say.")
        await send(ws, type="speak", context_id="turn", text="And a second segment queued behind it.")
        first = await until(ws, lambda m: m.type == "audio")
        await send(ws, type="cancel", context_id="turn")
        before = await until(ws, lambda m: m.type == "cancelled")
        await send(ws, type="speak", context_id="next", text=TEXT)
        await send(ws, type="flush", context_id="next")
        after = await until(ws, is_done("next"))
    assert not [m for m in after if getattr(m, "context_id", None) == "turn"]
    assert not [m for m in first + before if m.type == "segment_done"]
    assert len(audio_of(after, "next")) > 0


async def test_a_refusal_right_after_a_cancel_comes_after_its_cancelled(start_tts_server):
    """``cancelled`` is the last message of its context, and messages come in the order
    the server made them."""
    server = await start_tts_server()
    async with connect(server_url(server)) as ws:
        await recv_message(ws)
        await send(ws, type="speak", context_id="a", text=TEXT)
        await until(ws, lambda m: m.type == "audio")
        await send(ws, type="cancel", context_id="a")
        await send(ws, type="speak", context_id="a", text=TEXT, voice="nobody")
        messages = await until(ws, lambda m: m.type == "error")
    assert [m.type for m in messages if m.type != "audio"] == ["cancelled", "error"]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00\x01", ErrorCode.INVALID_MESSAGE),
        ("hello", ErrorCode.BAD_JSON),
        ('{"type": "sing", "context_id": "c"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "speak", "context_id": "c"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "speak", "context_id": "", "text": "hi"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "speak", "context_id": "c", "text": "hi", "sample_rate": 1}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "speak", "context_id": "c", "text": "hi", "sample_rate": "16000"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "speak", "context_id": "c", "text": "hi", "voice": "nobody"}', ErrorCode.UNKNOWN_VOICE),
        ('{"type": "speak", "context_id": "c", "text": "hi", "mode": "karaoke"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "speak", "context_id": "c", "text": "  "}', ErrorCode.EMPTY_TEXT),
    ],
)
async def test_bad_input_gets_a_typed_error_and_the_session_goes_on(start_tts_server, alone, frame, code):
    server = await start_tts_server()
    async with connect(server_url(server)) as ws:
        await recv_message(ws)
        await ws.send(frame)
        error = await until(ws, lambda m: m.type == "error")
        assert error[-1].code == code and not error[-1].fatal
        await send(ws, type="speak", context_id="ok", text=TEXT)
        await send(ws, type="flush", context_id="ok")
        messages = await until(ws, is_done("ok"))
    assert np.abs(audio_of(messages, "ok").astype(int) - alone(TEXT)).max() <= 1


async def test_a_client_that_leaves_mid_segment_frees_its_work(start_tts_server):
    server = await start_tts_server()
    ws = await connect(server_url(server))
    await recv_message(ws)
    await send(ws, type="speak", context_id="turn", text="A rather long sentence that takes a while to say.")
    await until(ws, lambda m: m.type == "audio")
    ws.transport.abort()
    for _ in range(100):
        if server.engine.session_count == 0 and not server.engine.has_work():
            break
        await asyncio.sleep(0.05)
    assert server.engine.session_count == 0 and not server.engine.has_work()


async def test_metrics_report_first_audio_and_realtime_factor(start_tts_server):
    server = await start_tts_server()
    await _speak_and_wait(server_url(server), "t", TEXT)
    status, body = await asyncio.to_thread(http_get, server_url(server, "/metrics", "http"))
    metrics = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if line and not line.startswith("#"))
    assert float(metrics["tts_first_audio_seconds_count"]) == 1
    assert float(metrics["tts_realtime_factor_count"]) >= 10
    assert float(metrics["tts_audio_seconds_total"]) > 1
    health = json.loads((await asyncio.to_thread(http_get, server_url(server, "/health", "http")))[1])
    assert health["status"] == "ready"
    # On this CPU every part runs eagerly; on a GPU, the batch each replays from CUDA graphs.
    assert health["cuda_graphs"] == dict.fromkeys(("text_encoder", "decoder_step", "prefill", "sampler", "codec"), 0)


async def test_a_client_that_reads_is_not_dropped_for_a_burst_of_audio(start_tts_server):
    """A batched segment's audio (one message a second) is sent at once when it is whole:
    more than the limit of unsent messages, to a client reading all along."""
    server = await start_tts_server()
    server.max_unsent_messages = 2
    messages = await _speak_and_wait(
        server_url(server), "turn", "A long sentence to speak for a while. " * 3, mode="batch"
    )
    assert [m.type for m in messages].count("audio") > 2 and messages[-1].type == "done"


async def test_a_client_that_stops_reading_is_dropped_and_its_work_stops(start_tts_server):
    """Its audio would pile up in the server for as long as the turn lasts (and the GPU
    would go on making it): past a limit of unsent messages the connection is dropped."""
    server = await start_tts_server()
    server.max_unsent_messages, server.stalled_send_s = 4, 0.2
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once when unread
    stalled.connect(("127.0.0.1", server.port))
    async with connect(server_url(server), sock=stalled, max_queue=1) as ws:
        await recv_message(ws)
        for _ in range(4):
            await send(ws, type="speak", context_id="turn", text="A long sentence to speak for a while. " * 4)
        for _ in range(600):
            if server.engine.session_count == 0:
                break
            await asyncio.sleep(0.1)
        assert server.engine.session_count == 0
    assert not server.engine.has_work()
    assert len(await _speak_and_wait(server_url(server), "next", TEXT)) > 2, "others are served as before"
