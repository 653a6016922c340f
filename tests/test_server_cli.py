"""Stopping a server run from the command line (``servers.common.cli.run_server``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

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


def _hanging_stop(first: signal.Signals) -> subprocess.Popen:
    """The server, sent ``first`` once it serves, once it has begun to stop."""
    process = subprocess.Popen(
        [sys.executable, "-c", HANGING_STOP], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout.readline().strip() == "serving"
    process.send_signal(first)
    assert process.stdout.readline().strip() == "stopping"
    return process


def test_a_second_interrupt_exits_a_server_whose_stop_hangs():
    process = _hanging_stop(signal.SIGINT)
    try:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 128 + signal.SIGINT
    finally:
        process.kill()
        process.wait()


def test_a_supervisors_second_sigterm_leaves_the_stop_to_finish():
    """systemd signals the whole group, and then the bot stops its host too."""
    process = _hanging_stop(signal.SIGTERM)
    try:
        process.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)
    finally:
        process.kill()
        process.wait()
