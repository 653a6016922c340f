"""Running a server from the command line until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Protocol

from loguru import logger


class Server(Protocol):
    kind: str

    async def start(self) -> None: ...

    async def wait_loaded(self) -> None: ...

    async def stop(self) -> None: ...


async def _serve(server: Server) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        loading = asyncio.ensure_future(server.wait_loaded())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and loading.exception() is not None:
            logger.error(f"{server.kind} server cannot start: {loading.exception()}")
            return 1
        await stop.wait()
        return 0
    finally:
        await server.stop()


def run_server(server: Server, log_level: str) -> None:
    """Serve until interrupted; exit 1 if the model cannot be loaded."""
    logger.remove()
    logger.add(sys.stderr, level=log_level)
    sys.exit(asyncio.run(_serve(server)))
