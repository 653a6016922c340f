"""What the servers, the worker and the scheduler need of an engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


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
