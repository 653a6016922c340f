"""Faults put into real components: an engine that runs slower, as on a loaded GPU; a
call that fails once, as on a transient GPU error."""

from __future__ import annotations

import time


def slow_down(server, seconds_per_step: float) -> None:
    """Make every engine step of ``server`` take ``seconds_per_step`` longer."""
    step = server.engine.step

    def slow():
        time.sleep(seconds_per_step)
        return step()

    server.engine.step = slow


def fail_once(monkeypatch, owner, name: str, error: Exception) -> None:
    """Make ``owner.name`` raise ``error`` on its next call, then work as before."""
    working = getattr(owner, name)
    failures = iter([error])

    def failing(*args, **kwargs):
        for failure in failures:
            raise failure
        return working(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
