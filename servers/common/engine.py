"""What the servers, the worker and the scheduler need of an engine."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from pipecat_nvidia.protocol import ErrorMessage


class EngineFull(RuntimeError):
    """No session slot is left (``max_sessions``)."""


class SteppedEngine(Protocol):
    """An engine whose GPU work is ``step()``: many sessions, one batched step at a time."""

    @property
    def session_count(self) -> int: ...

    def open_session(self, sink: Callable[[Any], None]) -> int: ...

    def close_session(self, sid: int) -> None: ...

    def has_work(self) -> bool: ...

    def wait_for_work(self, timeout: float | None = None) -> bool: ...

    def step(self) -> Any: ...

    def wake(self) -> None: ...


class WorkSignal:
    """The stepping side every engine shares: one lock for its state, and waiting on it
    until there is work. Subclasses say what work is (``_has_work_locked``) and call
    ``_signal_work()`` under the lock when some arrives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self.on_work: Callable[[], None] = lambda: None
        """Called (under the engine's lock) whenever work arrives: a scheduler's wake-up."""

    def _signal_work(self) -> None:
        """Wake whatever waits for work: a worker in ``wait_for_work``, a scheduler via ``on_work``."""
        self._work.notify_all()
        self.on_work()

    def _has_work_locked(self) -> bool:
        raise NotImplementedError

    def has_work(self) -> bool:
        with self._lock:
            return self._has_work_locked()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        with self._work:
            return self._work.wait_for(self._has_work_locked, timeout=timeout)

    def wake(self) -> None:
        """Make a pending ``wait_for_work`` return (e.g. to shut down)."""
        with self._work:
            self._work.notify_all()

    def step(self) -> Any:
        raise NotImplementedError

    def run_until_idle(self) -> list:
        """Step on this thread until no work is left (warm-up, tests); each step's stats."""
        stats = []
        while self.has_work():
            stats.append(self.step())
        return stats


class SessionEngine(WorkSignal):
    """A ``WorkSignal`` engine that serves sessions, up to ``max_sessions`` at once."""

    def __init__(self, max_sessions: int) -> None:
        super().__init__()
        self.max_sessions = max_sessions
        self._sessions: dict[int, Any] = {}
        self._next_sid = 0

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    @contextmanager
    def _warm_up_session(self, what: str) -> Iterator[int]:
        """A session for warm-up work, closed after it. Engines answer a failed step with
        error messages and go on serving; here any error raises, since a model that fails
        its warm-up cannot serve."""
        errors: list[str] = []
        sid = self.open_session(lambda m: errors.append(m.message) if isinstance(m, ErrorMessage) else None)
        try:
            yield sid
        finally:
            self.close_session(sid)
        if errors:
            raise RuntimeError(f"{what} warm-up failed: {errors[0]}")

    def _add_session_locked(self, make: Callable[[int], Any]) -> int:
        """Register ``make(sid)`` under a new session id; ``EngineFull`` if none is left."""
        if len(self._sessions) >= self.max_sessions:
            raise EngineFull(f"all {self.max_sessions} sessions are in use")
        sid = self._next_sid
        self._next_sid += 1
        self._sessions[sid] = make(sid)
        return sid
