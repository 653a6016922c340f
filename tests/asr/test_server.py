"""The ASR WebSocket server on loopback with a real (tiny) model."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pipecat_nvidia.protocol import AsrReady, AsrTranscript, ErrorCode, ErrorMessage
from servers.asr import server as server_module
from tests.asr.client import (
    expect_fatal,
    http_get,
    recv_message,
    send_utterance,
    server_url,
    transcribe_over_ws,
    until_final,
)
from tests.asr.helpers import make_engine, offline_text


@pytest.fixture(scope="module")
def expected(tiny_asr_path):
    """What NeMo's offline pass makes of an utterance plus the 120 ms a finalize adds."""
    engine = make_engine(tiny_asr_path)
    cache = {}

    def text(pcm16: np.ndarray) -> str:
        key = pcm16.tobytes()
        if key not in cache:
            cache[key] = offline_text(engine, pcm16, padding_ms=120)
        return cache[key]

    return text


async def test_ready_describes_the_stream(start_asr_server):
    server = await start_asr_server()
    async with connect(server_url(server)) as ws:
        ready = await recv_message(ws)
    assert isinstance(ready, AsrReady)
    assert (ready.sample_rate, ready.chunk_ms, ready.right_context, ready.finalize_audio_ms) == (16000, 160, 1, 320)
    # Steps at 96 ms (9 mel frames: 8 plus half a 512-sample window), then every 160 ms.
    assert (ready.first_step_samples, ready.step_samples) == (1536, 2560)
    assert ready.session_id


async def test_the_server_declines_per_message_compression(start_asr_server):
    """PCM barely compresses, and deflating every 160 ms frame costs both ends CPU time
    (a tenth of the event loop's at 48 streams): a client that offers it gets plain frames."""
    server = await start_asr_server()
    async with connect(server_url(server)) as ws:  # offers permessage-deflate by default
        await recv_message(ws)
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        assert ws.protocol.extensions == []


async def test_client_gets_interims_then_the_final_transcript(start_asr_server, speech_int16, expected):
    server = await start_asr_server()
    utterance = speech_int16[: 16000 * 5]
    messages = await transcribe_over_ws(server_url(server), utterance)
    assert all(isinstance(m, AsrTranscript) for m in messages)
    *interims, final = messages
    assert interims and not any(m.is_final for m in interims)
    assert final.is_final and final.padding_ms == 120
    assert final.text == expected(utterance)
    assert all(final.text.startswith(m.text) for m in interims)


async def test_concurrent_clients_get_exactly_what_each_gets_alone(start_asr_server, speech_int16, expected):
    server = await start_asr_server()
    utterances = [
        speech_int16[16000 * 1 : 16000 * 4],
        speech_int16[16000 * 5 : 16000 * 9],
        np.zeros(16000 * 2, np.int16),
        speech_int16[16000 * 10 : 16000 * 12],
        speech_int16[16000 * 12 : 16000 * 17],
        speech_int16[: 16000 * 3 + 555],
    ]
    results = await asyncio.gather(
        *(
            transcribe_over_ws(server_url(server), u, frame=frame, realtime=True)
            for u, frame in zip(utterances, (320, 512, 2560, 160, 1000, 320))
        )
    )
    for utterance, messages in zip(utterances, results):
        assert messages[-1].text == expected(utterance)
    assert results[2][-1].text == ""


@pytest.mark.slow
async def test_fifty_concurrent_realtime_clients(start_asr_server, speech_int16, expected):
    server = await start_asr_server()
    slices = [speech_int16[16000 * k : 16000 * (k + 3)] for k in range(0, 15, 2)]
    results = await asyncio.gather(
        *(transcribe_over_ws(server_url(server), slices[i % len(slices)], realtime=True) for i in range(50))
    )
    for i, messages in enumerate(results):
        assert not any(isinstance(m, ErrorMessage) for m in messages)
        assert messages[-1].text == expected(slices[i % len(slices)])
    await asyncio.sleep(0.1)
    status, body = await asyncio.to_thread(http_get, server_url(server, "/health", "http"))
    assert json.loads(body)["sessions"] == 0
    assert server.engine._pool.in_use == 0


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x01\x02\x03", ErrorCode.BAD_AUDIO),
        ("not json", ErrorCode.BAD_JSON),
        ("[1, 2]", ErrorCode.BAD_JSON),
        ('{"finalize": true}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "launch"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "reset", "trailing_silence_ms": NaN}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "reset", "trailing_silence_ms": -5}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "reset", "finalise": true}', ErrorCode.INVALID_MESSAGE),
    ],
)
async def test_bad_input_gets_a_typed_error_and_the_session_goes_on(
    start_asr_server, speech_int16, expected, frame, code
):
    server = await start_asr_server()
    utterance = speech_int16[16000 : 16000 * 3]
    async with connect(server_url(server)) as ws:
        await recv_message(ws)
        await ws.send(frame)
        error = await recv_message(ws)
        assert isinstance(error, ErrorMessage) and error.code == code and not error.fatal
        await send_utterance(ws, utterance)
        messages = await until_final(ws)
    assert messages[-1].text == expected(utterance)


async def test_one_clients_bad_input_never_affects_another(start_asr_server, speech_int16, expected):
    server = await start_asr_server()
    utterance = speech_int16[16000 * 2 : 16000 * 6]

    async def vandal():
        rng = np.random.default_rng(7)
        async with connect(server_url(server)) as ws:
            await recv_message(ws)
            for _ in range(40):
                await ws.send(rng.integers(0, 256, size=int(rng.integers(1, 5000)), dtype=np.uint8).tobytes())
                await ws.send("{" * int(rng.integers(1, 50)))
                await asyncio.sleep(0.01)
            await ws.send(json.dumps({"type": "reset"}))
            return await until_final(ws)

    good, noisy = await asyncio.gather(transcribe_over_ws(server_url(server), utterance, realtime=True), vandal())
    assert good[-1].text == expected(utterance)
    assert any(isinstance(m, ErrorMessage) for m in noisy) and noisy[-1].is_final


async def test_a_flood_of_resets_is_refused_past_those_waiting_and_each_is_answered_once(
    start_asr_server, speech_int16, expected
):
    server = await start_asr_server()
    utterance = speech_int16[16000 : 16000 * 3]
    sent = 100
    async with connect(server_url(server)) as ws:
        await recv_message(ws)
        await asyncio.gather(*(ws.send(json.dumps({"type": "reset"})) for _ in range(sent)))
        answers = []
        while len(answers) < sent:
            message = await recv_message(ws)
            if isinstance(message, ErrorMessage) or message.is_final:
                answers.append(message)
        refused = [m for m in answers if isinstance(m, ErrorMessage)]
        assert refused and all(m.code == ErrorCode.AUDIO_OVERFLOW and not m.fatal for m in refused)
        await send_utterance(ws, utterance)
        messages = await until_final(ws)
    assert messages[-1].text == expected(utterance)


async def test_oversize_frames_are_refused_and_far_oversize_ones_close_only_that_connection(
    start_asr_server, speech_int16, expected
):
    server = await start_asr_server(max_message_bytes=10_000)
    async with connect(server_url(server), max_size=None) as ws:
        await recv_message(ws)
        await ws.send(bytes(12_000))
        error = await recv_message(ws)
        assert error.code == ErrorCode.MESSAGE_TOO_BIG
        await ws.send("\u20ac" * 4_000)  # 12 000 bytes of UTF-8 in 4 000 characters
        error = await recv_message(ws)
        assert error.code == ErrorCode.MESSAGE_TOO_BIG
        await ws.send(bytes(50_000))
        with pytest.raises(ConnectionClosed) as closed:
            await recv_message(ws)
    assert closed.value.rcvd.code == 1009
    messages = await transcribe_over_ws(server_url(server), speech_int16[16000 : 16000 * 3])
    assert messages[-1].text == expected(speech_int16[16000 : 16000 * 3])


async def test_messages_before_ready_get_not_ready_while_the_model_loads(
    start_asr_server, monkeypatch, speech_int16, expected
):
    gate = threading.Event()
    real_load = server_module.load_engine

    def gated_load(settings):
        gate.wait(timeout=60)
        return real_load(settings)

    monkeypatch.setattr(server_module, "load_engine", gated_load)
    server = await start_asr_server(wait=False)
    status, body = await asyncio.to_thread(http_get, server_url(server, "/health", "http"))
    assert status == 503 and json.loads(body)["status"] == "loading"
    utterance = speech_int16[16000 : 16000 * 3]
    async with connect(server_url(server)) as ws:
        await ws.send(utterance[:1600].tobytes())
        error = await recv_message(ws)
        assert error.code == ErrorCode.NOT_READY
        gate.set()
        assert isinstance(await recv_message(ws), AsrReady)
        await send_utterance(ws, utterance)
        messages = await until_final(ws)
    assert messages[-1].text == expected(utterance)
    status, body = await asyncio.to_thread(http_get, server_url(server, "/health", "http"))
    assert status == 200 and json.loads(body)["status"] == "ready"


async def test_health_says_how_many_sessions_a_step_replays_from_cuda_graphs(start_asr_server, monkeypatch):
    """An operator sees there when a failed capture left the server eager. On this CPU the
    graphs are the recorded stand-in: made to run as on a GPU."""
    monkeypatch.setattr(server_module, "graph_max_batch", lambda model, limit: limit)
    graphed = await start_asr_server(cuda_graph_max_batch=4)
    eager = await start_asr_server(cuda_graph_max_batch=0)
    for server, rows in ((graphed, 4), (eager, 0)):
        status, body = await asyncio.to_thread(http_get, server_url(server, "/health", "http"))
        assert status == 200 and json.loads(body)["cuda_graphs"] == {"encoder_step": rows}


async def test_a_model_that_fails_to_load_is_reported_to_health_and_clients(start_asr_server, tmp_path):
    server = await start_asr_server(wait=False, model=str(tmp_path / "missing.nemo"))
    with pytest.raises(RuntimeError, match="missing.nemo"):
        await server.wait_loaded()
    status, body = await asyncio.to_thread(http_get, server_url(server, "/health", "http"))
    assert status == 503 and json.loads(body)["status"] == "error"
    async with connect(server_url(server)) as ws:
        assert await expect_fatal(ws, ErrorCode.INTERNAL) == 1011


async def test_bearer_token_is_required_when_set(start_asr_server):
    server = await start_asr_server(auth_token="s3cret")
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server_url(server)):
            pass
    assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        async with connect(server_url(server), additional_headers={"Authorization": "Bearer wrong"}):
            pass
    async with connect(server_url(server), additional_headers={"Authorization": "Bearer s3cret"}) as ws:
        assert isinstance(await recv_message(ws), AsrReady)
    status, _ = await asyncio.to_thread(http_get, server_url(server, "/health", "http"))
    assert status == 200


async def test_the_bearer_schemes_name_is_case_blind_and_a_repeated_header_is_refused(start_asr_server):
    server = await start_asr_server(auth_token="s3cret")
    async with connect(server_url(server), additional_headers={"Authorization": "bearer s3cret"}) as ws:
        assert isinstance(await recv_message(ws), AsrReady)
    twice = [("Authorization", "Bearer s3cret"), ("Authorization", "Bearer s3cret")]
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server_url(server), additional_headers=twice):
            pass
    assert refused.value.response.status_code == 401


async def test_sessions_beyond_max_sessions_are_refused_until_one_leaves(start_asr_server):
    server = await start_asr_server(max_sessions=2)
    async with connect(server_url(server)) as first, connect(server_url(server)) as second:
        await recv_message(first)
        await recv_message(second)
        async with connect(server_url(server)) as third:
            assert await expect_fatal(third, ErrorCode.SERVER_FULL) == 1013
    async with connect(server_url(server)) as again:
        assert isinstance(await recv_message(again), AsrReady)


async def test_a_client_that_reconnects_at_once_gets_the_slot_its_closed_session_holds(start_asr_server, speech_int16):
    """At ``max_sessions``, a closed session's slot stays taken until the step running it
    ends; the new session waits for it instead of getting server_full."""
    server = await start_asr_server(max_sessions=1)
    batch_step = server.engine._step
    running, release = threading.Event(), threading.Event()
    run = batch_step.run

    def held_run(rows):
        running.set()
        release.wait(10)
        return run(rows)

    batch_step.run = held_run
    async with connect(server_url(server)) as old:
        await recv_message(old)
        await old.send(speech_int16[:16000].tobytes())
        assert await asyncio.to_thread(running.wait, 10)
    while server.engine.session_count:
        await asyncio.sleep(0.01)
    asyncio.get_running_loop().call_later(0.3, release.set)
    async with connect(server_url(server)) as new:
        assert isinstance(await recv_message(new), AsrReady)


async def test_a_client_that_drops_mid_utterance_is_cleaned_up(start_asr_server, speech_int16, expected):
    server = await start_asr_server()
    utterance = speech_int16[16000 * 2 : 16000 * 5]
    survivor = asyncio.create_task(transcribe_over_ws(server_url(server), utterance, realtime=True))
    for _ in range(3):
        ws = await connect(server_url(server))
        await recv_message(ws)
        for i in range(0, 16000, 320):
            await ws.send(speech_int16[i : i + 320].tobytes())
        ws.transport.abort()
    assert (await survivor)[-1].text == expected(utterance)
    for _ in range(100):
        if server.engine.session_count == 0:
            break
        await asyncio.sleep(0.05)
    assert server.engine.session_count == 0
    assert server.engine._pool.in_use == 0


async def test_metrics_count_sessions_steps_and_latencies(start_asr_server, speech_int16):
    server = await start_asr_server()
    await transcribe_over_ws(server_url(server), speech_int16[16000 : 16000 * 3], realtime=True)
    status, body = await asyncio.to_thread(http_get, server_url(server, "/metrics", "http"))
    assert status == 200
    metrics = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if line and not line.startswith("#"))
    assert float(metrics["asr_sessions_total"]) == 1
    assert float(metrics["asr_final_latency_seconds_count"]) == 1
    assert float(metrics["asr_interim_latency_seconds_count"]) >= 1
    assert float(metrics["asr_batch_size_count"]) >= 1
    # In real time every chunk streams before the reset: 9 frames + 11 x 16 of 2 s' 199.
    assert float(metrics["asr_chunk_latency_seconds_count"]) == 12
    assert float(metrics["asr_audio_seconds_total"]) == pytest.approx(2.0)


async def test_unknown_paths_are_not_found(start_asr_server):
    server = await start_asr_server()
    status, _ = await asyncio.to_thread(http_get, server_url(server, "/v2/anything", "http"))
    assert status == 404


async def test_a_client_that_never_answers_the_close_does_not_hold_up_stopping(start_asr_server):
    """A stop closes every connection and waits for each client's close in answer: one
    gone silent (stalled, or a half-dead network) must not hold it up for long."""
    server = await start_asr_server()
    await server.wait_loaded()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await writer.drain()
    assert b"101" in await reader.readline()
    try:
        await asyncio.wait_for(server.stop(), 5)
    finally:
        writer.close()


async def test_a_web_pages_connection_is_refused(start_asr_server):
    """A browser names the page's origin; the bot sends none."""
    server = await start_asr_server()
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server_url(server), origin="https://example.com"):
            pass
    assert refused.value.response.status_code == 403
