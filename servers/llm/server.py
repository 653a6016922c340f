"""An OpenAI-compatible ``/v1/chat/completions`` over the LLM engine (aiohttp).

Streaming answers arrive as server-sent events chunk by chunk as the engine's units
produce them; a client that disconnects cancels its request at once. Pipecat's
``OpenAILLMService`` (or ``pipecat_nvidia.llm.NemotronLLMService``) talks to it, and so
does anything that speaks OpenAI, so a cloud deployment can swap in vLLM or NIM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from http import HTTPStatus

from aiohttp import web
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from servers.common.http import bearer_token_matches
from servers.common.loading import BackgroundLoad, Driver, LoadingServer
from servers.llm.chat import PromptRejected
from servers.llm.config import LlmServerSettings
from servers.llm.engine import ChatRequest, ContextOverflow, LlmDelta, LLMEngine, LlmFinished
from servers.llm.logprobs import openai_logprobs
from servers.llm.metrics import LlmMetrics
from servers.llm.model import load_llama, resolve_source
from servers.llm.sampling import Sampling, SamplingRejected
from servers.llm.schema import ChatCompletionRequest
from servers.llm.structured import Grammar, response_grammar
from servers.llm.tool_grammar import forced_tool, tool_call_grammar


def load_engine(settings: LlmServerSettings) -> LLMEngine:
    source = resolve_source(settings.model, settings.quant)
    logger.info(f"Loading LLM {source.describe()}")
    llm = load_llama(
        source,
        context_size=settings.context_size,
        gpu_layers=settings.gpu_layers,
        main_gpu=settings.main_gpu,
        threads=settings.threads,
    )
    return LLMEngine(
        llm,
        first_segment_tokens=settings.first_segment_tokens,
        segment_tokens=settings.segment_tokens,
        default_max_tokens=settings.max_tokens,
        default_max_thinking_tokens=settings.max_thinking_tokens,
        max_queued=settings.max_queued,
        top_k=settings.top_k,
    )


STOP_GRACE_S = 1.0
"""How long a stop waits for the requests it cancelled to write their ends."""
STALLED_CLIENT_S = 10.0
"""How long a streamed chunk may wait for its client to read before the client is dropped."""

_FORM_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
"""Content types a browser posts across origins without a preflight."""

_OPENAI_ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "invalid_request_error",
    HTTPStatus.NOT_FOUND: "invalid_request_error",
    HTTPStatus.METHOD_NOT_ALLOWED: "invalid_request_error",
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "invalid_request_error",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "invalid_request_error",
}


def error_body(code: str, message: str, status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR) -> dict:
    """OpenAI's error object: ``type`` is its class of error, ``code`` ours."""
    return {"error": {"message": message, "type": _OPENAI_ERROR_TYPES.get(status, "server_error"), "code": code}}


def error_response(status: HTTPStatus, code: str, message: str) -> web.Response:
    return web.json_response(error_body(code, message, status), status=status.value)


class LlmServer(LoadingServer):
    kind = "LLM"

    def __init__(self, settings: LlmServerSettings, driver: Driver | None = None):
        self.settings = settings
        self.metrics = LlmMetrics()
        self._loading = BackgroundLoad(
            self.kind, settings.model, lambda: load_engine(settings), self.metrics.observe_step, driver
        )
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def engine(self) -> LLMEngine | None:
        return self._loading.engine

    @property
    def port(self) -> int:
        return self._site._server.sockets[0].getsockname()[1]

    async def listen(self) -> None:
        app = web.Application(
            client_max_size=self.settings.max_message_bytes, middlewares=[self._json_errors, self._auth]
        )
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        # A client that goes away cancels its handler, and with it the request's generation.
        # A client that stalls (half a body sent, a stream not read) must not hold up a stop
        # for aiohttp's default minute: the others' ends are written within the grace.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=STOP_GRACE_S)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
        await self._site.start()
        logger.info(f"LLM server listening on http://{self.settings.host}:{self.port}/v1")

    async def stop(self) -> None:
        """Cancel what is in flight (its clients get their ends at once), then close."""
        if self.engine is not None:
            self.engine.cancel_all()
        if self._runner is not None:
            await self._runner.cleanup()
        await self._loading.stop()

    # ------------------------------------------------------------------ HTTP

    @web.middleware
    async def _json_errors(self, request: web.Request, handler):
        """OpenAI's clients read an error from its JSON: a path or method the API lacks is
        answered with one too."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400 or not request.path.startswith("/v1/"):
                raise
            status = HTTPStatus(e.status)
            return error_response(status, status.name.lower(), f"{request.method} {request.path}: {e.reason}")

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        token = self.settings.auth_token
        if token and request.path.startswith("/v1/"):
            authorization = request.headers.getall("Authorization", [])
            if not (len(authorization) == 1 and bearer_token_matches(authorization[0], token)):
                return error_response(HTTPStatus.UNAUTHORIZED, "unauthorized", "missing or wrong bearer token")
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        engine = self.engine
        ready, details = self._loading.health(requests=engine.session_count if engine else 0)
        return web.json_response(details, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.settings.model, "object": "model", "owned_by": "local"}]}
        )

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        engine = self.engine
        if engine is None:
            if self._loading.error is not None:
                return self._refuse(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "internal", f"the model failed to load: {self._loading.error}"
                )
            return self._refuse(HTTPStatus.SERVICE_UNAVAILABLE, "not_ready", "the model is still loading")
        if request.content_type in _FORM_TYPES:
            # What a web page may post to a loopback server without the browser asking
            # first: it must not fill the queue. OpenAI's clients send application/json.
            return self._refuse(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "invalid_request",
                f"a {request.content_type} body is not taken; send Content-Type: application/json",
            )
        try:
            body = ChatCompletionRequest.model_validate(json.loads(await request.read()))
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "too_large",
                f"the body is larger than {self.settings.max_message_bytes} bytes",
            )
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return self._refuse(HTTPStatus.BAD_REQUEST, "bad_json", "the body is not JSON (or is nested too deeply)")
        except ValidationError as e:
            return self._refuse(HTTPStatus.BAD_REQUEST, "invalid_request", _validation_message(e))
        grammar = None
        if body.response_format is not None or body.forces_tool_call:
            try:
                grammar = await asyncio.to_thread(_answer_grammar, body, engine)
            except ValueError as e:
                return self._refuse(HTTPStatus.BAD_REQUEST, "invalid_request", str(e))
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            prepared = await asyncio.to_thread(engine.prepare, _chat_request(body, grammar))
            rid = engine.submit(prepared, lambda event: loop.call_soon_threadsafe(self._deliver, events, event))
        except ContextOverflow as e:
            return self._refuse(HTTPStatus.BAD_REQUEST, "context_length_exceeded", str(e))
        except (PromptRejected, SamplingRejected) as e:
            return self._refuse(HTTPStatus.BAD_REQUEST, "invalid_request", str(e))
        except UnicodeEncodeError:
            return self._refuse(HTTPStatus.BAD_REQUEST, "invalid_request", "the text holds unpaired surrogates")
        except OverflowError as e:
            return self._refuse(HTTPStatus.TOO_MANY_REQUESTS, "busy", str(e))
        self.metrics.active.inc()
        completion = _Completion(body.model or self.settings.model, arrived, body.include_usage)
        try:
            if body.stream:
                return await self._stream(request, events, completion, body)
            return await self._collect(events, completion, body)
        finally:
            # A client that went away (or any failure here) must not keep the GPU busy.
            engine.cancel(rid)
            self.metrics.active.dec()

    def _refuse(self, status: HTTPStatus, code: str, message: str) -> web.Response:
        self.metrics.errors.labels(code=code).inc()
        return error_response(status, code, message)

    async def _stream(self, request, events: asyncio.Queue, completion: _Completion, body) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            await self._send_stream(response, events, completion, body)
        except ConnectionResetError as e:
            logger.debug(f"LLM client dropped ({e}); its request is cancelled")
            if request.transport is not None:
                request.transport.close()
        return response

    async def _send_stream(self, response, events: asyncio.Queue, completion: _Completion, body) -> None:
        await _send_event(response, completion.chunk({"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, LlmDelta):
                self._observe_first_text(completion)
                delta = {"content": event.content} if event.content else {}
                if event.reasoning:
                    delta["reasoning_content"] = event.reasoning
                logprobs = openai_logprobs(event.logprobs) if event.logprobs else None
                await _send_event(response, completion.chunk(delta, logprobs=logprobs))
                continue
            failure = self._failure(event)
            if failure is not None:
                # OpenAI's way to fail a stream that has begun: its clients raise APIError.
                status, code, message = failure
                await _send_event(response, error_body(code, message, status))
                await _write(response, None)
                return
            # One call per chunk, as OpenAI streams them (Pipecat reads each chunk's first).
            for i, call in enumerate(event.tool_calls):
                await _send_event(response, completion.chunk({"tool_calls": [{"index": i, **call.as_openai()}]}))
            await _send_event(response, completion.chunk({}, finish_reason=event.finish_reason))
            if body.include_usage:
                await _send_event(response, {**completion.chunk_header(), "choices": [], "usage": _usage(event)})
            await _write(response, b"data: [DONE]\n\n")
            await _write(response, None)
            return

    async def _collect(self, events: asyncio.Queue, completion: _Completion, body) -> web.Response:
        content, reasoning, logprobs = [], [], []
        while True:
            event = await events.get()
            if isinstance(event, LlmDelta):
                self._observe_first_text(completion)
                content.append(event.content)
                reasoning.append(event.reasoning)
                logprobs.extend(event.logprobs)
                continue
            failure = self._failure(event)
            if failure is not None:
                return error_response(*failure)
            # As OpenAI answers a reply that only calls tools: no content at all.
            message = {"role": "assistant", "content": "".join(content) or (None if event.tool_calls else "")}
            if any(reasoning):
                message["reasoning_content"] = "".join(reasoning)
            if event.tool_calls:
                message["tool_calls"] = [call.as_openai() for call in event.tool_calls]
            choice = {
                "index": 0,
                "message": message,
                "logprobs": openai_logprobs(logprobs) if body.logprobs else None,
                "finish_reason": event.finish_reason,
            }
            return web.json_response(
                {**completion.header("chat.completion"), "choices": [choice], "usage": _usage(event)}
            )

    def _failure(self, event: LlmFinished) -> tuple[HTTPStatus, str, str] | None:
        """What a client still waiting is told of a request that ended without its answer
        (one cancelled while its client waits was cancelled by the server stopping)."""
        if event.finish_reason == "error":
            failure = (HTTPStatus.INTERNAL_SERVER_ERROR, "internal", event.error or "generation failed")
        elif event.finish_reason == "cancelled":
            failure = (HTTPStatus.SERVICE_UNAVAILABLE, "stopping", "the server is stopping")
        else:
            return None
        self.metrics.errors.labels(code=failure[1]).inc()
        return failure

    def _observe_first_text(self, completion: _Completion) -> None:
        if not completion.first_text_seen:
            completion.first_text_seen = True
            self.metrics.first_token.observe(time.monotonic() - completion.started)

    def _deliver(self, events: asyncio.Queue, event: LlmDelta | LlmFinished) -> None:
        """On the event loop: count a finished request (whether or not its client is still there)."""
        if isinstance(event, LlmFinished):
            self.metrics.requests.labels(finish_reason=event.finish_reason).inc()
            self.metrics.cached_tokens.inc(event.usage.cached_tokens)
        events.put_nowait(event)


class _Completion:
    """The identity every chunk of one completion repeats."""

    def __init__(self, model: str, started: float, include_usage: bool = False):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.started = started
        self.include_usage = include_usage
        """Every chunk has ``usage`` (null but the last), as OpenAI streams it when asked."""
        self.first_text_seen = False

    def header(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk_header(self) -> dict:
        return self.header("chat.completion.chunk")

    def chunk(self, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self.chunk_header(), "choices": [choice], **({"usage": None} if self.include_usage else {})}


def _answer_grammar(body: ChatCompletionRequest, engine: LLMEngine) -> Grammar | None:
    """The grammar that holds the answer to a forced tool call or to the response format
    (with reasoning on, the answer after it); ValueError, saying which field, for one that
    cannot be had. Large schemas take seconds: run it off the event loop."""
    field = "tool_choice" if body.forces_tool_call else "response_format"
    try:
        forced = forced_tool(body.tools, body.tool_choice) if body.forces_tool_call else None
        if forced is not None:
            several = body.tool_choice == "required" and body.parallel_calls
            text = tool_call_grammar(forced, engine.tool_call_form, several=several)
        else:
            text = response_grammar(body.response_format or {"type": "text"})
        if text is None:
            return None
        return Grammar(engine.vocab, text, tool_calls=forced is not None, after=_reasoning_end(body, engine))
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from e


def _reasoning_end(body: ChatCompletionRequest, engine: LLMEngine) -> tuple[int, str] | None:
    """Where a grammar for the answer starts: at the end of the reasoning, if it is on."""
    if not body.enable_thinking:
        return None
    if engine.reasoning_end is None:
        raise ValueError("with reasoning on, the model's </think> must be one token")
    return engine.reasoning_end


def _chat_request(body: ChatCompletionRequest, grammar: Grammar | None) -> ChatRequest:
    tools = None if body.tool_choice == "none" else body.tools
    messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in body.messages]
    return ChatRequest(
        messages=messages,
        tools=tools or None,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        sampling=_sampling(body),
        stop=tuple(body.stop or ()),
        parallel_tool_calls=body.parallel_calls,
        enable_thinking=body.enable_thinking,
        max_thinking_tokens=body.nvext.max_thinking_tokens if body.nvext else None,
        grammar=grammar,
        top_logprobs=body.logprobs_alternatives,
    )


def _sampling(body: ChatCompletionRequest) -> Sampling:
    """The request's sampling fields (the schema has each of ``Sampling``'s), each the
    default where it is left out or null."""
    given = {f.name: getattr(body, f.name) for f in dataclasses.fields(Sampling)}
    return Sampling(**{name: value for name, value in given.items() if value is not None})


def _usage(event: LlmFinished) -> dict:
    u = event.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


async def _send_event(response: web.StreamResponse, payload: dict) -> None:
    await _write(response, f"data: {json.dumps(payload)}\n\n".encode())


async def _write(response: web.StreamResponse, data: bytes | None) -> None:
    """A write (None: the stream's end) that a client which stopped reading cannot hold
    for ever: ConnectionResetError, as if it had gone, and its request ends."""
    try:
        await asyncio.wait_for(response.write_eof() if data is None else response.write(data), STALLED_CLIENT_S)
    except TimeoutError:
        raise ConnectionResetError(f"the client read nothing for {STALLED_CLIENT_S:.0f} s") from None


def _validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]
