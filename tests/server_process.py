"""Running a server as its own process, the way its command line starts it."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.asr.client import http_get

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` different free ports (held together while picked)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@contextlib.contextmanager
def listening_socket() -> Iterator[int]:
    """A port some other program holds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@contextlib.contextmanager
def server_process(module: str, *args: str, timeout: float = 180.0) -> Iterator[int]:
    """Start ``python -m module args --port P``, wait until /health says ready, yield P;
    then SIGTERM it and check that it exits cleanly."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", module, *args, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline and process.poll() is None and status != 200:
            try:
                status, _ = http_get(f"http://127.0.0.1:{port}/health")
            except OSError:
                time.sleep(0.5)
        assert status == 200, f"{module} never became healthy"
        yield port
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
