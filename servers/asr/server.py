"""The streaming ASR WebSocket server: sessions in, transcripts out; the engine does the rest.

This is the I/O layer only. Audio and resets go straight to the engine (cheap, never
blocking); transcripts come back from the engine thread through each connection's
outbox. Model loading runs in a thread while ``/health`` says "loading".
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass

from loguru import logger
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from pipecat_nvidia.protocol import (
    AsrReady,
    AsrServerMessage,
    AsrTranscript,
    ErrorCode,
    ErrorMessage,
    ProtocolError,
    parse_asr_client_message,
)
from servers.asr.config import AsrServerSettings
from servers.asr.engine import AudioOverflow, EngineFull, StreamingASREngine
from servers.asr.metrics import AsrMetrics
from servers.asr.model import load_streaming_model
from servers.common.http import make_process_request
from servers.common.worker import EngineWorker

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_INTERNAL_ERROR = 1011


def load_engine(settings: AsrServerSettings) -> StreamingASREngine:
    model = load_streaming_model(settings.model, right_context=settings.right_context, device=settings.resolved_device)
    engine = StreamingASREngine(
        model,
        right_context=settings.right_context,
        max_sessions=settings.max_sessions,
        max_buffered_s=settings.max_buffered_s,
        max_utterance_s=settings.max_utterance_s,
        precision=settings.precision,
    )
    engine.warm_up()
    return engine


@dataclass(frozen=True)
class _Close:
    """Queued after a fatal error: the send loop sends what is before it, then closes."""

    code: int
    reason: str


class _Outbox:
    """What waits to be sent to one client. A newer interim replaces an unsent one of the
    same utterance, so a slow reader gets fresh text instead of a growing backlog."""

    def __init__(self) -> None:
        self._items: deque[AsrServerMessage | _Close] = deque()
        self._nonempty = asyncio.Event()

    def put(self, message: AsrServerMessage | _Close) -> None:
        last = self._items[-1] if self._items else None
        if (
            isinstance(message, AsrTranscript)
            and isinstance(last, AsrTranscript)
            and not message.is_final
            and not last.is_final
            and last.utterance_id == message.utterance_id
        ):
            self._items[-1] = message
        else:
            self._items.append(message)
        self._nonempty.set()

    async def get(self) -> AsrServerMessage | _Close:
        while not self._items:
            self._nonempty.clear()
            await self._nonempty.wait()
        return self._items.popleft()


class AsrServer:
    def __init__(self, settings: AsrServerSettings):
        self.settings = settings
        self.metrics = AsrMetrics()
        self._engine: StreamingASREngine | None = None
        self._worker: EngineWorker | None = None
        self._ready = asyncio.Event()
        self._load_error: str | None = None
        self._server: Server | None = None
        self._loading: asyncio.Task | None = None
        self._started = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen at once; load the model in the background (``/health`` shows progress)."""
        s = self.settings
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=make_process_request(
                health=self._health, registry=self.metrics.registry, auth_token=s.auth_token
            ),
            max_size=4 * s.max_message_bytes,
        )
        logger.info(f"ASR server listening on ws://{s.host}:{self.port} (model loading)")
        self._loading = asyncio.create_task(self._load())

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def wait_loaded(self) -> None:
        """Return once the model is ready; raise if loading failed."""
        await asyncio.shield(self._loading)
        if self._load_error is not None:
            raise RuntimeError(self._load_error)

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop)

    async def _load(self) -> None:
        started = time.monotonic()
        try:
            engine = await asyncio.to_thread(load_engine, self.settings)
        except Exception as e:  # noqa: BLE001 - reported on /health and to clients
            logger.exception("Loading the ASR model failed")
            self._load_error = f"{type(e).__name__}: {e}"
            self._ready.set()
            return
        self._engine = engine
        self._worker = EngineWorker(engine, "asr-engine", on_step=self.metrics.observe_step)
        self._worker.start()
        g = engine.geometry
        logger.info(
            f"ASR ready in {time.monotonic() - started:.1f} s: {self.settings.model}, "
            f"{g.chunk_ms:.0f} ms chunks (right context {g.right_context}) on {self.settings.resolved_device}"
        )
        self._ready.set()

    def _health(self) -> tuple[bool, dict]:
        if self._load_error is not None:
            status = "error"
        elif self._engine is None:
            status = "loading"
        else:
            status = "ready"
        details = {
            "status": status,
            "model": self.settings.model,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "sessions": self._engine.session_count if self._engine else 0,
            "max_sessions": self.settings.max_sessions,
        }
        if self._load_error is not None:
            details["error"] = self._load_error
        return status == "ready", details

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: ServerConnection) -> None:
        outbox = _Outbox()
        sender = asyncio.create_task(self._send_loop(ws, outbox))
        sid: int | None = None
        try:
            await self._refuse_until_ready(ws, outbox)
            if self._engine is None:
                self._fatal(
                    outbox, ErrorCode.INTERNAL, f"model failed to load: {self._load_error}", CLOSE_INTERNAL_ERROR
                )
                await sender
                return
            loop = asyncio.get_running_loop()
            try:
                sid = self._engine.open_session(lambda message: _deliver(loop, outbox, message))
            except EngineFull as e:
                self._fatal(outbox, ErrorCode.SERVER_FULL, str(e), CLOSE_TRY_AGAIN_LATER)
                await sender
                return
            self.metrics.sessions.inc()
            self.metrics.sessions_total.inc()
            session_id = uuid.uuid4().hex[:12]
            logger.debug(f"ASR session {session_id} opened from {ws.remote_address}")
            g = self._engine.geometry
            outbox.put(
                AsrReady(
                    session_id=session_id,
                    model=self.settings.model,
                    sample_rate=g.sample_rate,
                    chunk_ms=g.chunk_ms,
                    right_context=g.right_context,
                    finalize_audio_ms=g.finalize_audio_ms,
                )
            )
            async for message in ws:
                self._on_message(sid, message, outbox)
        except ConnectionClosed:
            pass
        finally:
            if sid is not None:
                self._engine.close_session(sid)
                self.metrics.sessions.dec()
            sender.cancel()

    async def _refuse_until_ready(self, ws: ServerConnection, outbox: _Outbox) -> None:
        """While the model loads, keep the connection and answer every message not_ready."""
        while not self._ready.is_set():
            received = asyncio.ensure_future(ws.recv())
            ready = asyncio.ensure_future(self._ready.wait())
            done, _ = await asyncio.wait({received, ready}, return_when=asyncio.FIRST_COMPLETED)
            if received in done:
                received.result()
                self._error(outbox, ErrorCode.NOT_READY, "the model is still loading; wait for 'ready'")
            else:
                # recv() is cancel-safe, but the next recv() may start only once this one is over.
                received.cancel()
                await asyncio.wait({received})
            ready.cancel()

    def _on_message(self, sid: int, message: str | bytes, outbox: _Outbox) -> None:
        limit = self.settings.max_message_bytes
        if len(message) > limit:
            self._error(outbox, ErrorCode.MESSAGE_TOO_BIG, f"frame of {len(message)} bytes exceeds {limit}")
        elif isinstance(message, bytes):
            if len(message) % 2:
                self._error(outbox, ErrorCode.BAD_AUDIO, "audio must be whole 16-bit samples (even byte count)")
                return
            try:
                self._engine.push_audio(sid, message)
            except AudioOverflow as e:
                self._error(outbox, ErrorCode.AUDIO_OVERFLOW, f"{e}; this frame was dropped")
                return
            self.metrics.audio_seconds.inc(len(message) / 2 / self._engine.geometry.sample_rate)
        else:
            try:
                reset = parse_asr_client_message(message)
            except ProtocolError as e:
                self._error(outbox, e.code, str(e))
                return
            self._engine.reset(sid, finalize=reset.finalize, trailing_silence_ms=reset.trailing_silence_ms)

    def _error(self, outbox: _Outbox, code: ErrorCode, message: str) -> None:
        outbox.put(ErrorMessage(code=code, message=message))

    def _fatal(self, outbox: _Outbox, code: ErrorCode, message: str, close_code: int) -> None:
        outbox.put(ErrorMessage(code=code, message=message, fatal=True))
        outbox.put(_Close(close_code, code.value))

    async def _send_loop(self, ws: ServerConnection, outbox: _Outbox) -> None:
        try:
            while True:
                message = await outbox.get()
                if isinstance(message, _Close):
                    await ws.close(message.code, message.reason)
                    return
                await ws.send(message.to_json())
                if isinstance(message, AsrTranscript):
                    self.metrics.observe_transcript(message)
                elif isinstance(message, ErrorMessage):
                    self.metrics.observe_error(message.code)
        except ConnectionClosed:
            pass


def _deliver(loop: asyncio.AbstractEventLoop, outbox: _Outbox, message: AsrServerMessage) -> None:
    """Hand a message from the engine thread to the event loop (dropped once it is closed)."""
    try:
        loop.call_soon_threadsafe(outbox.put, message)
    except RuntimeError:
        pass
