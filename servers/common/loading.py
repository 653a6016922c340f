"""Loading a model in the background and handing its engine to whatever drives it.

A server listens at once and reports "loading" on ``/health`` while this runs. Once the
engine is built, its driver starts it: standalone servers give it its own worker thread,
the local GPU host hands it to the shared scheduler instead.

Loads in one process run one at a time, in the order they were started: NeMo's
``restore_from`` changes the process's working directory to a temporary one it deletes
afterwards, so two at once break each other (and, on a GPU, the LLM's quantisation is
chosen by the memory the others leave, so it must come last).

A load cannot be interrupted (NeMo's and llama.cpp's loaders have no way to), so a server
that stops meanwhile abandons it: queued loads never start, and the one under way runs
on a daemon thread that the process does not wait for (see ``load_under_way``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from loguru import logger

from servers.common.worker import EngineWorker

E = TypeVar("E")
StepObserver = Callable[[Any], None]
Driver = Callable[[Any, StepObserver], Callable[[], None]]
"""Starts driving an engine, reporting each step's stats to the observer; returns how to
stop (called from a thread at shutdown)."""


def own_worker(kind: str) -> Driver:
    """The standalone driver: a thread that steps the engine whenever it has work."""

    def drive(engine, on_step: StepObserver) -> Callable[[], None]:
        worker = EngineWorker(engine, f"{kind.lower()}-engine", on_step=on_step)
        worker.start()
        return worker.stop

    return drive


class _LoadTurns:
    """Turns handed out first come, first served (a lock's are not ordered)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._issued = 0
        self._serving = 0
        self.under_way: str | None = None

    def ticket(self) -> int:
        with self._changed:
            self._issued += 1
            return self._issued - 1

    @contextlib.contextmanager
    def turn(self, ticket: int, kind: str):
        """Wait for ``ticket``'s turn; every ticket must pass through here, or later ones wait for good."""
        with self._changed:
            self._changed.wait_for(lambda: self._serving == ticket)
            self.under_way = kind
        try:
            yield
        finally:
            with self._changed:
                self.under_way = None
                self._serving += 1
                self._changed.notify_all()


_TURNS = _LoadTurns()


EXCLUSIVE_GPU_WORK = threading.Lock()
"""Held while an engine warms up, capturing its CUDA graphs, and by a scheduler around each
unit it runs: while one thread captures, PyTorch's CUDA generator is in capture mode for the
whole process, and a replay or a random draw on any other thread fails."""


def load_under_way() -> str | None:
    """The kind of model whose load is running in this process now (an abandoned one included)."""
    return _TURNS.under_way


class LoadAbandoned(Exception):
    """The server stopped before this load's turn came."""


class BackgroundLoad(Generic[E]):
    def __init__(self, kind: str, model: str, load: Callable[[], E], on_step: StepObserver, driver: Driver | None):
        self.kind = kind
        self.model = model
        self._load = load
        self._on_step = on_step
        self._driver = driver or own_worker(kind)
        self.engine: E | None = None
        self.error: str | None = None
        self.ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stop_driver: Callable[[], None] | None = None
        self._started = time.monotonic()
        self._queued = False
        self._abandoned = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def wait(self) -> None:
        """Return once the engine runs; raise if loading failed."""
        await asyncio.shield(self._task)
        if self.error is not None:
            raise RuntimeError(self.error)

    async def stop(self) -> None:
        self._abandoned = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._stop_driver is not None:
            await asyncio.to_thread(self._stop_driver)

    @property
    def status(self) -> str:
        return "error" if self.error is not None else "loading" if self.engine is None else "ready"

    def health(self, **details: Any) -> tuple[bool, dict]:
        report = {
            "status": self.status,
            "model": self.model,
            "uptime_s": round(time.monotonic() - self._started, 1),
            **details,
        }
        if self.status == "loading":
            report["queued"] = self._queued  # another model loads first
        if self.error is not None:
            report["error"] = self.error
        return self.status == "ready", report

    def _load_in_turn(self, ticket: int) -> E:
        with _TURNS.turn(ticket, self.kind):
            self._queued = False
            if self._abandoned:
                raise LoadAbandoned(self.kind)
            return self._load()

    async def _load_in_daemon_thread(self) -> E:
        """Like ``asyncio.to_thread``, but on a thread of its own that neither the event
        loop's shutdown nor the interpreter's exit waits for."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[E] = loop.create_future()

        def settle(result: E | None, error: BaseException | None) -> None:
            if outcome.done():
                return
            if error is None:
                outcome.set_result(result)
            else:
                outcome.set_exception(error)

        def load(ticket: int) -> None:
            try:
                result, error = self._load_in_turn(ticket), None
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(settle, result, error)

        self._queued = True
        ticket = _TURNS.ticket()
        threading.Thread(target=load, args=(ticket,), name=f"{self.kind.lower()}-load", daemon=True).start()
        return await outcome

    async def _run(self) -> None:
        started = time.monotonic()
        try:
            engine = await self._load_in_daemon_thread()
        except Exception as e:  # noqa: BLE001 - reported on /health and to clients
            logger.exception(f"Loading the {self.kind} model failed")
            self.error = f"{type(e).__name__}: {e}"
            self.ready.set()
            return
        self._stop_driver = self._driver(engine, self._on_step)
        self.engine = engine
        logger.info(f"{self.kind} ready in {time.monotonic() - started:.1f} s: {self.model}")
        self.ready.set()


class LoadingServer(ABC):
    """A server that listens at once and loads its model in ``_loading`` meanwhile. The
    local GPU host calls ``listen`` on each of its servers before any ``start_loading``."""

    _loading: BackgroundLoad

    async def start(self) -> None:
        """Listen at once; load the model in the background (``/health`` shows progress)."""
        await self.listen()
        self.start_loading()

    @abstractmethod
    async def listen(self) -> None: ...

    def start_loading(self) -> None:
        self._loading.start()

    async def wait_loaded(self) -> None:
        """Return once the model is ready; raise if loading failed."""
        await self._loading.wait()
