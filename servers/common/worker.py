"""Steps an engine on its own thread whenever it has work (a standalone server's driver).

In the local GPU host the single-GPU scheduler drives ``engine.step()`` instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from loguru import logger

from servers.common.engine import SteppedEngine


class EngineWorker:
    def __init__(self, engine: SteppedEngine, name: str, on_step: Callable[[Any], None] | None = None):
        self._engine = engine
        self._on_step = on_step
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._engine.wake()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self._engine.wait_for_work(timeout=0.5):
                continue
            try:
                stats = self._engine.step()
                if self._on_step is not None:
                    self._on_step(stats)
            except Exception:  # noqa: BLE001 - the engine thread must outlive any one step
                logger.exception(f"{self._thread.name} step failed")
