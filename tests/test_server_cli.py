"""Stopping a server run from the command line (``servers.common.cli.run_server``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from tests.server_process import ROOT

# A server whose stop hangs, as one does behind an engine step stuck on the GPU.
HANGING_STOP = textwrap.dedent(
    """
    import asyncio
    from servers.common.cli import run_server

    class HangingStop:
        kind = "test"

        async def start(self):
            print("serving", flush=True)

        async def wait_loaded(self):
            await asyncio.Event().wait()

        async def stop(self):
            print("stopping", flush=True)
            await asyncio.sleep(3600)

    run_server(HangingStop(), "INFO")
    """
)


def test_a_second_interrupt_exits_a_server_whose_stop_hangs():
    process = subprocess.Popen(
        [sys.executable, "-c", HANGING_STOP], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout.readline().strip() == "serving"
        process.send_signal(signal.SIGINT)
        assert process.stdout.readline().strip() == "stopping"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 128 + signal.SIGINT
    finally:
        process.kill()
        process.wait()
