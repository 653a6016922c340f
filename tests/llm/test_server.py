"""The OpenAI-compatible endpoint on loopback, driven by the ``openai`` client."""

import asyncio
import json
import socket
import time

import aiohttp
import pytest
from openai import APIError, AsyncOpenAI, AuthenticationError
from prometheus_client import generate_latest

from servers.llm import server as server_module
from servers.llm.random_model import CHAT_TEMPLATE, vocabulary, write_random_llama_gguf
from tests.llm.helpers import SYSTEM
from tests.llm.scripted_model import write_scripted_llama_gguf

QUESTION = [SYSTEM, {"role": "user", "content": "hello world"}]
PIECES = vocabulary()[0]


def client(server, **kwargs) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=kwargs.pop("api_key", "none"), **kwargs)


async def test_streamed_completion_equals_the_whole_one(start_llm_server):
    server = await start_llm_server()
    llm = client(server)
    whole = await llm.chat.completions.create(model="m", messages=QUESTION, max_tokens=24, temperature=0)
    chunks = [
        c
        async for c in await llm.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=24, temperature=0, stream=True
        )
    ]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "text arrives in pieces"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24


async def test_no_part_of_a_stop_sequence_is_streamed(start_llm_server, tmp_path):
    model = write_scripted_llama_gguf(tmp_path / "stop.gguf", ["Fine", ".", " Us", "er", ":", " hi"])
    server = await start_llm_server(model=str(model))
    stream = await client(server).chat.completions.create(
        model="m", messages=QUESTION, max_tokens=20, stream=True, stop="User:"
    )
    chunks = [chunk.choices[0] async for chunk in stream]
    deltas = [c.delta.content for c in chunks if c.delta.content]
    assert "".join(deltas) == "Fine. " and not any("U" in d for d in deltas)
    assert chunks[-1].finish_reason == "stop"


async def test_usage_reports_the_prompt_tokens_reused_from_the_cache(start_llm_server):
    server = await start_llm_server()
    llm = client(server)
    first = await llm.chat.completions.create(model="m", messages=QUESTION, max_tokens=10, temperature=0)
    turn = [*QUESTION, {"role": "assistant", "content": first.choices[0].message.content}]
    turn.append({"role": "user", "content": "and the city?"})
    second = await llm.chat.completions.create(
        model="m", messages=turn, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    usage = [c async for c in second][-1].usage
    assert usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


TOOL_RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def _schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "bad_json"),
        (json.dumps({"messages": []}).encode(), "invalid_request"),
        (json.dumps({"messages": [{"content": "hi"}]}).encode(), "invalid_request"),
        (json.dumps({"messages": QUESTION, "stop": [""]}).encode(), "invalid_request"),
        (json.dumps({"messages": QUESTION, "stop": [str(i) for i in range(17)]}).encode(), "invalid_request"),
        (json.dumps({"messages": QUESTION, "tool_choice": "required"}).encode(), "invalid_request"),
        (
            json.dumps(
                {"messages": QUESTION, "tools": [{"type": "function", "function": "x"}], "tool_choice": "required"}
            ).encode(),
            "invalid_request",
        ),
        (json.dumps({"messages": QUESTION, "top_logprobs": 2}).encode(), "invalid_request"),
        (json.dumps({"messages": QUESTION, "logprobs": True, "top_logprobs": 21}).encode(), "invalid_request"),
        (json.dumps({"messages": QUESTION, "presence_penalty": 2.5}).encode(), "invalid_request"),
        (json.dumps({"messages": QUESTION, "logit_bias": {"a": 1}}).encode(), "invalid_request"),
        (json.dumps({"messages": QUESTION, "response_format": {"type": "yaml"}}).encode(), "invalid_request"),
        (
            json.dumps({"messages": QUESTION, "response_format": _schema({"$ref": "https://x.test/s"})}).encode(),
            "invalid_request",
        ),
        (
            json.dumps({"messages": QUESTION, "response_format": _schema({"type": "nonsense"})}).encode(),
            "invalid_request",
        ),
        (
            json.dumps(
                {"messages": QUESTION, "response_format": {"type": "json_object"}, "tools": [WEATHER_TOOL]}
            ).encode(),
            "invalid_request",
        ),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), "invalid_request"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "invalid_request"),
        (
            json.dumps({"messages": [*QUESTION, {"role": "assistant", "tool_calls": ["x"]}, TOOL_RESULT]}).encode(),
            "invalid_request",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "hi \ud800"}]}).encode(), "invalid_request"),
        (b"[" * 100_000 + b"]" * 100_000, "bad_json"),
        (json.dumps({"messages": [{"role": "user", "content": "hello " * 2000}]}).encode(), "context_length_exceeded"),
    ],
)
async def test_bad_requests_get_a_typed_error_and_the_server_goes_on(start_llm_server, body, code):
    server = await start_llm_server()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=body) as response:
            assert response.status == 400
            error = (await response.json())["error"]
            assert (error["code"], error["type"]) == (code, "invalid_request_error")
    ok = await client(server).chat.completions.create(model="m", messages=QUESTION, max_tokens=3)
    assert ok.usage.completion_tokens == 3


async def test_a_stream_that_fails_midway_raises_in_the_client_and_the_server_goes_on(start_llm_server, monkeypatch):
    """A failure after text has streamed reaches the client as OpenAI's error event, not
    as an ordinary end of the answer."""
    server = await start_llm_server()
    engine = type(server.engine)
    generate, calls = engine._generate, []

    def fail_on_the_second_segment(self, generation, count, *rest):
        calls.append(count)
        if len(calls) == 2:
            raise RuntimeError("injected fault")
        return generate(self, generation, count, *rest)

    monkeypatch.setattr(engine, "_generate", fail_on_the_second_segment)
    llm = client(server)
    stream = await llm.chat.completions.create(model="m", messages=QUESTION, max_tokens=40, stream=True)
    text = []
    with pytest.raises(APIError, match="injected fault"):
        async for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
    assert "".join(text), "the first segment streamed before the failure"
    monkeypatch.undo()
    again = await llm.chat.completions.create(model="m", messages=QUESTION, max_tokens=4)
    assert again.choices[0].finish_reason == "length"


async def test_a_client_that_disconnects_cancels_its_request(start_llm_server):
    server = await start_llm_server()
    async with aiohttp.ClientSession() as http:
        body = {"messages": QUESTION, "max_tokens": 900, "stream": True}
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body) as response:
            await response.content.readline()
    await _assert_one_request_was_cancelled(server)


async def test_a_client_that_gives_up_on_a_whole_answer_cancels_its_request(start_llm_server):
    server = await start_llm_server(context_size=4096)
    async with aiohttp.ClientSession() as http:
        body = {"messages": QUESTION, "max_tokens": 4000}
        with pytest.raises(asyncio.TimeoutError):
            await http.post(
                f"http://127.0.0.1:{server.port}/v1/chat/completions",
                json=body,
                timeout=aiohttp.ClientTimeout(total=0.1),
            )
    await _assert_one_request_was_cancelled(server)


async def test_messages_the_chat_template_refuses_get_a_typed_error(start_llm_server, tmp_path):
    strict = "{%- if messages[-1].role == 'assistant' %}{{ raise_exception('end with the user') }}{% endif %}"
    path = write_random_llama_gguf(tmp_path / "strict.gguf", chat_template=strict + CHAT_TEMPLATE)
    server = await start_llm_server(model=str(path))
    async with aiohttp.ClientSession() as http:
        body = {"messages": [*QUESTION, {"role": "assistant", "content": "hi"}]}
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body) as response:
            assert response.status == 400
            error = (await response.json())["error"]
    assert error["code"] == "invalid_request" and "end with the user" in error["message"]
    ok = await client(server).chat.completions.create(model="m", messages=QUESTION, max_tokens=3)
    assert ok.usage.completion_tokens == 3


async def test_a_model_that_failed_to_load_is_reported_not_awaited(start_llm_server, tmp_path):
    server = await start_llm_server(wait=False, model=str(tmp_path / "missing.gguf"))
    with pytest.raises(RuntimeError):
        await server.wait_loaded()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json={"messages": QUESTION}) as r:
            assert r.status == 500
            assert "failed to load" in (await r.json())["error"]["message"]


async def test_stopping_the_server_cancels_requests_in_flight(start_llm_server):
    """Its client is told, rather than given a cut answer that looks whole."""
    server = await start_llm_server(context_size=4096)
    stream = await client(server).chat.completions.create(model="m", messages=QUESTION, max_tokens=4000, stream=True)
    await anext(aiter(stream))
    stopping = asyncio.create_task(server.stop())
    with pytest.raises(APIError, match="stopping"):
        async for _ in stream:
            pass
    await stopping
    metrics = generate_latest(server.metrics.registry).decode()
    assert 'llm_requests_total{finish_reason="cancelled"} 1.0' in metrics


async def test_a_client_stalled_midway_does_not_hold_up_stopping(start_llm_server):
    """One that sent half a body (or stopped reading its stream): a server asked to stop
    (Ctrl-C, a container's stop) goes at once, not after aiohttp's minute of grace."""
    server = await start_llm_server()
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"model": '
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    try:
        await asyncio.wait_for(server.stop(), 5)
    finally:
        writer.close()


async def test_a_streaming_client_that_stops_reading_is_dropped(start_llm_server, monkeypatch):
    """Its answer is done, but the writes wait on a full socket: without a limit the
    handler, the answer's events and ``llm_requests_active`` would be held for ever."""
    monkeypatch.setattr(server_module, "STALLED_CLIENT_S", 0.5)
    server = await start_llm_server(context_size=4096)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    body = json.dumps(
        {
            "model": "m",
            "messages": QUESTION,
            "max_tokens": 3500,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 20,
            # Plain text to the end: an answer of megabytes, more than the sockets hold.
            "logit_bias": {PIECES.index(p): -100 for p in ("<|im_end|>", "<think>", "<tool_call>")},
        }
    ).encode()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(request + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    try:
        for _ in range(300):
            await asyncio.sleep(0.05)
            if server.metrics.registry.get_sample_value("llm_requests_active") == 0:
                break
        assert server.metrics.registry.get_sample_value("llm_requests_active") == 0
    finally:
        sock.close()


async def test_time_to_first_token_counts_from_the_requests_arrival(start_llm_server, monkeypatch):
    """Reading the body and building a grammar (seconds, for a large schema) are part of
    the wait its client sees."""
    build_grammar = server_module._answer_grammar

    def slow_grammar(*args):
        time.sleep(0.5)
        return build_grammar(*args)

    monkeypatch.setattr(server_module, "_answer_grammar", slow_grammar)
    server = await start_llm_server()
    json_answer = {"type": "json_object"}
    await client(server).chat.completions.create(
        model="m", messages=QUESTION, max_tokens=2, response_format=json_answer
    )
    assert server.metrics.registry.get_sample_value("llm_time_to_first_token_seconds_sum") >= 0.5


async def test_content_given_as_text_parts_is_the_same_prompt_as_text(start_llm_server):
    server = await start_llm_server()
    llm = client(server)
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    as_parts = await llm.chat.completions.create(
        model="m", messages=[SYSTEM, {"role": "user", "content": parts}], max_tokens=4
    )
    as_text = await llm.chat.completions.create(model="m", messages=QUESTION, max_tokens=4)
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


async def test_a_body_over_the_size_limit_gets_a_json_error(start_llm_server):
    server = await start_llm_server(max_message_bytes=2000)
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 4000}]}).encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=body) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "too_large"


async def test_the_server_answers_others_while_it_reads_a_huge_prompt(start_llm_server):
    """Rendering and tokenizing megabytes of text takes seconds, off the event loop."""
    server = await start_llm_server()
    body = json.dumps({"messages": [{"role": "user", "content": "hello world " * 300_000}]}).encode()
    finished = []
    async with aiohttp.ClientSession() as http:

        async def post_huge():
            async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=body) as response:
                finished.append(("huge", response.status))

        async def get_health():
            await asyncio.sleep(0.3)
            async with http.get(f"http://127.0.0.1:{server.port}/health") as response:
                finished.append(("health", response.status))

        await asyncio.gather(post_huge(), get_health())
    assert finished == [("health", 200), ("huge", 400)]


async def _sse_events(server, body: dict) -> list:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            text = await response.text()
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_with_include_usage_every_chunk_has_usage_null_but_the_last(start_llm_server):
    server = await start_llm_server()
    body = {"messages": QUESTION, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    events = await _sse_events(server, body)
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4


async def test_null_for_n_and_stream_is_their_default(start_llm_server):
    server = await start_llm_server()
    body = {"messages": QUESTION, "max_tokens": 2, "n": None, "stream": None}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body) as response:
            assert response.status == 200
            answer = await response.json()
    assert answer["object"] == "chat.completion" and len(answer["choices"]) == 1


async def test_a_reply_that_only_calls_tools_has_null_content(start_llm_server, tmp_path):
    script = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>']
    server = await start_llm_server(model=str(write_scripted_llama_gguf(tmp_path / "tools.gguf", script)))
    reply = await client(server).chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER_TOOL])
    message = reply.choices[0].message
    assert message.content is None and [c.function.name for c in message.tool_calls] == ["get_weather"]


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)]
)
async def test_a_path_or_method_the_api_lacks_gets_an_openai_error(start_llm_server, method, path, status):
    server = await start_llm_server()
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"http://127.0.0.1:{server.port}{path}") as response:
            assert response.status == status
            error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and path in error["message"]


async def test_tool_choice_none_drops_the_tools(start_llm_server):
    server = await start_llm_server()
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    llm = client(server)
    with_tools = await llm.chat.completions.create(model="m", messages=QUESTION, tools=[tool], max_tokens=1)
    without = await llm.chat.completions.create(
        model="m", messages=QUESTION, tools=[tool], tool_choice="none", max_tokens=1
    )
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens


async def test_a_bearer_token_is_required_when_set(start_llm_server):
    server = await start_llm_server(auth_token="s3cret")
    with pytest.raises(AuthenticationError) as refused:
        await client(server, api_key="wrong").chat.completions.create(model="m", messages=QUESTION, max_tokens=1)
    assert refused.value.type == "authentication_error"
    ok = await client(server, api_key="s3cret").chat.completions.create(model="m", messages=QUESTION, max_tokens=1)
    assert ok.choices[0].finish_reason == "length"


async def test_a_body_that_is_not_declared_json_is_refused(start_llm_server):
    """What a web page can post to a loopback server without the browser asking first."""
    server = await start_llm_server()
    body = json.dumps({"model": "m", "messages": QUESTION, "max_tokens": 1})
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
        async with http.post(url, data=body, headers={"Content-Type": "text/plain"}) as response:
            assert response.status == 415
            assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_a_token_that_is_not_text_is_refused_like_a_wrong_one(start_llm_server):
    server = await start_llm_server(auth_token="s3cret")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
    await writer.drain()
    head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    assert head.split()[1] == b"401"
    assert json.loads(body)["error"]["type"] == "authentication_error"


async def test_health_says_loading_then_ready(start_llm_server):
    server = await start_llm_server(wait=False)
    assert json.loads(await _get(server, "/health"))["status"] in ("loading", "ready")
    await server.wait_loaded()
    assert json.loads(await _get(server, "/health"))["status"] == "ready"


async def test_metrics_report_the_process_cpu_time_and_memory(start_llm_server):
    server = await start_llm_server()
    metrics = await _get(server, "/metrics")
    assert "process_cpu_seconds_total" in metrics and "process_resident_memory_bytes" in metrics


async def _assert_one_request_was_cancelled(server) -> None:
    for _ in range(100):
        if not server.engine.has_work():
            break
        await asyncio.sleep(0.02)
    assert not server.engine.has_work()
    metrics = await _get(server, "/metrics")
    assert 'llm_requests_total{finish_reason="cancelled"} 1.0' in metrics


async def _get(server, path: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.port}{path}") as response:
            return await response.text()
