"""Running a server from the command line until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Protocol

from loguru import logger

from servers.common.loading import load_under_way


class Server(Protocol):
    kind: str

    async def start(self) -> None: ...

    async def wait_loaded(self) -> None: ...

    async def stop(self) -> None: ...


def _exit_now(code: int) -> None:
    """Exit without waiting for anything (threads, a load, interpreter teardown)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _serve(server: Server) -> int:
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        # A stop waits for the engine's step under way; a second Ctrl-C is the way out
        # of one that hangs (a stuck GPU), short of kill -9. A supervisor's SIGTERMs
        # (systemd's to the whole group, then the bot's to its host) stop it gracefully.
        if stop.is_set() and sig is signal.SIGINT:
            logger.warning("Interrupted again: exiting without finishing the stop")
            _exit_now(128 + sig)
        logger.info(f"{sig.name}: stopping {server.kind}; Ctrl-C again exits at once")
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.start()
    except (OSError, OverflowError) as e:  # the port is taken or out of range, or the address is not ours
        logger.error(f"Cannot listen ({server.kind}): {e}")
        await server.stop()
        return 1
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
    """Serve until interrupted; exit 1 if a port cannot be bound or a model cannot be loaded.

    Stopping while a model loads exits at once: the load cannot be interrupted, and a
    normal exit would tear the interpreter down under it (or wait minutes for a download).
    """
    logger.remove()
    logger.add(sys.stderr, level=log_level)
    code = 1
    try:
        code = asyncio.run(_serve(server))
    except Exception:  # noqa: BLE001 - logged; the exit below must still not wait for a load
        logger.exception(f"{server.kind} stopped on an error")
    abandoned = load_under_way()
    if abandoned is not None:
        logger.info(f"Exiting without waiting for the {abandoned} model load to finish")
        _exit_now(code)
    sys.exit(code)
