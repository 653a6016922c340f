"""``python -m servers.asr``: run the streaming ASR server until interrupted."""

from __future__ import annotations

import asyncio
import signal
import sys

from loguru import logger

from servers.asr.config import parse_settings
from servers.asr.server import AsrServer


async def _serve(server: AsrServer) -> int:
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
            logger.error(f"ASR server cannot start: {loading.exception()}")
            return 1
        await stop.wait()
        return 0
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    logger.remove()
    logger.add(sys.stderr, level=settings.log_level)
    sys.exit(asyncio.run(_serve(AsrServer(settings))))


if __name__ == "__main__":
    main()
