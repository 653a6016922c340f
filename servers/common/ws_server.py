"""A WebSocket server around a stepped engine: the I/O every pipecat-nvidia server shares.

It listens at once and loads the model in a thread (``/health`` says "loading"), holds
connections made meanwhile and answers their messages ``not_ready``, refuses sessions
beyond the engine's limit, sends each connection's messages from one outbox in order,
and frees a session the moment its client goes. Subclasses say how to load the engine,
what ``ready`` says, and what each client message does.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from abc import abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from loguru import logger
from pydantic import BaseModel
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from pipecat_nvidia.protocol import ErrorCode, ErrorMessage
from servers.common.engine import EngineFull, SteppedEngine
from servers.common.http import make_process_request
from servers.common.loading import BackgroundLoad, Driver, LoadingServer
from servers.common.metrics import ServerMetrics

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_INTERNAL_ERROR = 1011
SLOT_RELEASE_WAIT_S = 1.0
"""How long a new session waits for a slot that a closed session holds until the step
running it ends (a client that reconnects at once, at ``max_sessions``)."""
CLOSE_TIMEOUT_S = 1.0
"""How long a closing connection waits for the client's close (websockets' default: 10 s)."""


class ServerSettings(Protocol):
    model: str
    host: str
    port: int
    max_sessions: int
    max_message_bytes: int
    auth_token: str | None


@dataclass(frozen=True)
class CloseRequest:
    """Queued after a fatal error: the send loop sends what is before it, then closes."""

    code: int
    reason: str


PutPolicy = Callable[[deque, Any], None]
"""How a message joins the unsent ones (append it, replace a stale one, drop others)."""


class Outbox:
    """What waits to be sent to one client, in order, as the server's ``put_policy`` says:
    a slow reader then gets fresh interims rather than a backlog, and a cancelled turn's
    unsent audio is dropped. Past ``limit`` unsent messages while a send has waited
    ``stalled_after_s`` for the client to read, the client is not reading at all:
    ``on_overflow`` is called, once. (A count alone would drop a client that reads: one
    step may finish many turns' audio at once.)"""

    def __init__(
        self,
        put_policy: PutPolicy = deque.append,
        limit: int | None = None,
        on_overflow: Callable[[], None] | None = None,
        stalled_after_s: float = 0.0,
    ):
        self._items: deque[BaseModel | CloseRequest] = deque()
        self._nonempty = asyncio.Event()
        self._put_policy = put_policy
        self._limit = limit
        self._on_overflow = on_overflow
        self._stalled_after_s = stalled_after_s
        self.sending_since: float | None = None
        """``time.monotonic()`` when the send now waiting for the client began (None: none waits)."""

    def put(self, message: BaseModel | CloseRequest) -> None:
        self._put_policy(self._items, message)
        self._nonempty.set()
        if self._limit is not None and len(self._items) > self._limit and self._stalled():
            on_overflow, self._on_overflow = self._on_overflow, None
            if on_overflow is not None:
                on_overflow()

    def _stalled(self) -> bool:
        return self.sending_since is not None and time.monotonic() - self.sending_since >= self._stalled_after_s

    async def get(self) -> BaseModel | CloseRequest:
        while not self._items:
            self._nonempty.clear()
            await self._nonempty.wait()
        return self._items.popleft()


class Deliveries:
    """Hands messages from engine threads to the event loop's outboxes, a burst at a time.

    A step may produce a message for each of hundreds of sessions: waking the loop once
    per message would cost the engine thread a system call each (milliseconds per step),
    so the first message of a burst schedules one hand-over and the rest join it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._pending: list[tuple[Outbox, BaseModel]] = []
        self._lock = threading.Lock()

    def post(self, outbox: Outbox, message: BaseModel) -> None:
        """Any thread: queue ``message`` for ``outbox`` (dropped once the loop is closed)."""
        with self._lock:
            self._pending.append((outbox, message))
            if len(self._pending) > 1:
                return
        try:
            self._loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:
            pass

    def _hand_over(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for outbox, message in pending:
            outbox.put(message)


@dataclass
class Connection:
    """One client's session: its engine session id, and the way its messages reach its
    outbox, the engine's: an error the server gives at once (a refused ``speak`` after a
    ``cancel``) keeps its place after what the engine said before it."""

    sid: int
    send: Callable[[BaseModel], None]

    def error(self, code: ErrorCode, message: str, **fields) -> None:
        self.send(ErrorMessage(code=code, message=message, **fields))


class GraphedEngine(SteppedEngine, Protocol):
    """An engine that can replay its steps from CUDA graphs."""

    @property
    def graph_batches(self) -> dict[str, int]:
        """Largest batch each part of a step replays from CUDA graphs now (0: eager);
        ``/health`` asks from the event loop."""
        ...


E = TypeVar("E", bound=GraphedEngine)


class EngineServer(LoadingServer, Generic[E]):
    kind: str
    """"ASR" or "TTS", for logs and the worker thread's name."""
    max_unsent_messages = 512
    """A client with this many messages waiting (minutes of TTS audio), while a send has
    waited ``stalled_send_s`` for it to read, has stopped reading: its connection is
    dropped, which ends its session and the work done for it."""
    stalled_send_s = 5.0

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics, driver: Driver | None = None):
        """``driver`` starts the loaded engine (default: its own worker thread)."""
        self.settings = settings
        self.metrics = metrics
        self._loading = BackgroundLoad(self.kind, settings.model, self.load_engine, metrics.observe_step, driver)
        self._server: Server | None = None
        self._deliveries: Deliveries | None = None

    # ------------------------------------------------------------------ what a server says

    @abstractmethod
    def load_engine(self) -> E:
        """Load the model and build a warmed-up engine (runs in a thread)."""

    @abstractmethod
    def ready_message(self, engine: E, session_id: str) -> BaseModel: ...

    @abstractmethod
    def handle_message(self, engine: E, connection: Connection, message: str | bytes) -> None:
        """Act on one client message (size already checked); never blocks."""

    def put_policy(self, items: deque, message: Any) -> None:
        """How a message joins the unsent ones of a connection (appended by default)."""
        items.append(message)

    def observe_sent(self, message: BaseModel) -> None:
        if isinstance(message, ErrorMessage):
            self.metrics.errors.labels(code=message.code.value).inc()

    # ------------------------------------------------------------------ lifecycle

    @property
    def engine(self) -> E | None:
        return self._loading.engine

    async def listen(self) -> None:
        s = self.settings
        self._deliveries = Deliveries(asyncio.get_running_loop())
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=make_process_request(
                health=self._health, registry=self.metrics.registry, auth_token=s.auth_token
            ),
            max_size=4 * s.max_message_bytes,
            compression=None,  # audio barely deflates; compressing each frame only costs CPU
            # A client that does not answer a close (stalled, or gone) holds a stop no longer.
            close_timeout=CLOSE_TIMEOUT_S,
            # Clients are programs (the bot), which send no Origin: a web page the operator
            # visits, which must, cannot fill the sessions of a server on loopback.
            origins=[None],
        )
        logger.info(f"{self.kind} server listening on ws://{s.host}:{self.port}")

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._loading.stop()

    def _health(self) -> tuple[bool, dict]:
        engine = self.engine
        return self._loading.health(
            sessions=engine.session_count if engine else 0,
            max_sessions=self.settings.max_sessions,
            cuda_graphs=engine.graph_batches if engine else {},
        )

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: ServerConnection) -> None:
        outbox = Outbox(self.put_policy, self.max_unsent_messages, lambda: self._drop_stalled(ws), self.stalled_send_s)
        sender = asyncio.create_task(self._send_loop(ws, outbox))
        connection: Connection | None = None
        try:
            await self._refuse_until_ready(ws, outbox)
            engine = self.engine
            if engine is None:
                self._fatal(
                    outbox, ErrorCode.INTERNAL, f"model failed to load: {self._loading.error}", CLOSE_INTERNAL_ERROR
                )
                await sender
                return
            deliveries = self._deliveries

            def send(message: BaseModel) -> None:
                deliveries.post(outbox, message)

            try:
                sid = await self._open_session(engine, send)
            except EngineFull as e:
                self._fatal(outbox, ErrorCode.SERVER_FULL, str(e), CLOSE_TRY_AGAIN_LATER)
                await sender
                return
            connection = Connection(sid, send)
            self.metrics.sessions.inc()
            self.metrics.sessions_total.inc()
            session_id = uuid.uuid4().hex[:12]
            logger.debug(f"{self.kind} session {session_id} opened from {ws.remote_address}")
            outbox.put(self.ready_message(engine, session_id))
            async for message in ws:
                limit = self.settings.max_message_bytes
                size = len(message.encode()) if isinstance(message, str) else len(message)
                if size > limit:
                    connection.error(ErrorCode.MESSAGE_TOO_BIG, f"frame of {size} bytes exceeds {limit}")
                else:
                    self.handle_message(engine, connection, message)
        except ConnectionClosed:
            pass
        finally:
            if connection is not None:
                engine.close_session(connection.sid)
                self.metrics.sessions.dec()
            sender.cancel()

    async def _open_session(self, engine: E, sink: Callable[[Any], None]) -> int:
        """A session; ``EngineFull`` only when ``max_sessions`` clients are connected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SLOT_RELEASE_WAIT_S
        while True:
            try:
                return engine.open_session(sink)
            except EngineFull:
                if engine.session_count >= self.settings.max_sessions or loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.01)

    def _drop_stalled(self, ws: ServerConnection) -> None:
        logger.warning(
            f"{self.kind} client {ws.remote_address} stopped reading ({self.max_unsent_messages} messages unsent); "
            "dropping its connection"
        )
        ws.transport.abort()

    async def _refuse_until_ready(self, ws: ServerConnection, outbox: Outbox) -> None:
        """While the model loads, keep the connection and answer every message not_ready."""
        while not self._loading.ready.is_set():
            received = asyncio.ensure_future(ws.recv())
            ready = asyncio.ensure_future(self._loading.ready.wait())
            try:
                done, _ = await asyncio.wait({received, ready}, return_when=asyncio.FIRST_COMPLETED)
                if received in done:
                    received.result()  # raises when the client has gone
                    outbox.put(
                        ErrorMessage(code=ErrorCode.NOT_READY, message="the model is still loading; wait for 'ready'")
                    )
                else:
                    # recv() is cancel-safe, but the next recv() may start only once this one is over.
                    received.cancel()
                    await asyncio.wait({received})
            finally:
                ready.cancel()

    def _fatal(self, outbox: Outbox, code: ErrorCode, message: str, close_code: int) -> None:
        outbox.put(ErrorMessage(code=code, message=message, fatal=True))
        outbox.put(CloseRequest(close_code, code.value))

    async def _send_loop(self, ws: ServerConnection, outbox: Outbox) -> None:
        try:
            while True:
                message = await outbox.get()
                if isinstance(message, CloseRequest):
                    await ws.close(message.code, message.reason)
                    return
                outbox.sending_since = time.monotonic()
                await ws.send(message.model_dump_json())
                outbox.sending_since = None
                self.observe_sent(message)
        except ConnectionClosed:
            pass
