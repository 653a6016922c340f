"""A server whose engine runs slower, as on a loaded GPU."""

from __future__ import annotations

import time


def slow_down(server, seconds_per_step: float) -> None:
    """Make every engine step of ``server`` take ``seconds_per_step`` longer."""
    step = server.engine.step

    def slow():
        time.sleep(seconds_per_step)
        return step()

    server.engine.step = slow
