"""Running the local GPU host (``python -m scheduler``) as a child of the bot.

``bot.py`` starts it when no server URLs are configured, shows its progress while the
models download and load, and stops it when the bot exits.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from loguru import logger

from pipecat_nvidia.agent import AgentSettings
from servers.extras import lacking_server_extra


def health_urls(settings: AgentSettings) -> dict[str, str]:
    def health(url: str) -> str:
        return f"http://{urlsplit(url).netloc}/health"  # an IPv6 address keeps its brackets

    return {"ASR": health(settings.asr_url), "TTS": health(settings.tts_url), "LLM": health(settings.llm_url)}


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Health is asked of this machine's own ports: never through an ``http_proxy`` the
environment names (it would answer for them, or not at all)."""

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before it starts: the kernel sends it SIGTERM when the bot dies,
    however it dies (SIGKILL included), so no host is left holding the GPU and the ports."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn_child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``args`` as a process that ends with this one (on Linux; elsewhere only
    ``LocalHost.stop`` ends it). Call it from the main thread: the kernel ties the child
    to the thread that started it."""
    return subprocess.Popen(
        args,
        env=env,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        # Ctrl-C in the terminal is the bot's alone: the bot stops the host when it exits
        # (a host that stopped first would look, to the bot, like one that died).
        start_new_session=True,
    )


def read_health(url: str) -> dict | None:
    """The endpoint's health report (also for 503 while loading); None if unreachable."""
    try:
        with _DIRECT.open(url, timeout=2) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        try:
            return json.load(e)
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def stop_bot_if_it_dies(
    process: subprocess.Popen, stopping: threading.Event, force_after_s: float = 5.0
) -> threading.Event:
    """The agent cannot hear or speak without its host: if the host dies unasked, say so
    and end the bot (SIGINT, as Ctrl-C would) rather than fail every turn quietly. A call
    in progress holds the runner's graceful shutdown open; a second SIGINT ends it.
    Returns what is set when that happens (the bot then exits with a failure)."""
    died = threading.Event()

    def watch() -> None:
        code = process.wait()
        if stopping.is_set():
            return
        died.set()
        logger.error(f"The local GPU host exited with code {code}; stopping the bot")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(force_after_s)
        logger.warning("The bot is still running without its GPU host; interrupting it again")
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="local-host-watch", daemon=True).start()
    return died


class PortTaken(RuntimeError):
    """Something already listens where the local host would."""


def port_in_use(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class LocalHost:
    def __init__(self, settings: AgentSettings, extra_args: tuple[str, ...] = ()):
        self._settings = settings
        # -P: this package's scheduler, not a scheduler.py in the folder the bot runs in.
        self._args = [sys.executable, "-P", "-m", "scheduler", *_port_args(settings), *extra_args]
        self._process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self.died = threading.Event()
        """Set if the host, once ready, exits unasked."""

    def start(self) -> None:
        """Start the host; refuse if this machine lacks the server side, or if one of its
        ports is taken (a host left running by another bot would otherwise answer in its place)."""
        if lacking := lacking_server_extra("host"):
            raise RuntimeError(
                f"it {lacking}, or set NVIDIA_ASR_URL, NVIDIA_TTS_URL and NVIDIA_LLM_URL to servers that run elsewhere"
            )
        self._refuse_taken_ports()
        logger.info(f"Starting the local GPU host: {' '.join(self._args[1:])}")
        # The host asks for the token the bot sends (through the environment: arguments
        # are visible to every user of the machine), and for none when the bot sends none.
        env = {k: v for k, v in os.environ.items() if k != "HOST_AUTH_TOKEN"}
        if self._settings.auth_token:
            env["HOST_AUTH_TOKEN"] = self._settings.auth_token
        self._process = spawn_child(self._args, env)

    def _refuse_taken_ports(self) -> None:
        for name, url in health_urls(self._settings).items():
            parts = urlsplit(url)
            if not port_in_use(parts.hostname, parts.port):
                continue
            report = read_health(url)
            if report is not None and "status" in report:
                raise PortTaken(
                    f"port {parts.port} already serves {name} ({report['status']}, {report.get('model')}): "
                    f"stop that server (another bot's GPU host?), or set NVIDIA_{name}_URL to use it"
                )
            raise PortTaken(
                f"port {parts.port} (the local {name} server's) is taken by another program: "
                f"free it, or move the host with HOST_{name}_PORT"
            )

    def wait_ready(self, timeout_s: float = 600.0, report_every_s: float = 10.0) -> None:
        """Block until every endpoint is ready, showing progress. Downloading and loading
        the models may take as long as it takes; ``timeout_s`` bounds only the wait for
        the host to answer at all."""
        urls = health_urls(self._settings)
        started = time.monotonic()
        reported = started
        answered = False
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(f"the local GPU host exited with code {self._process.returncode}")
            reports = {name: read_health(url) for name, url in urls.items()}
            answered = answered or any(reports.values())
            statuses = {name: _progress(r) for name, r in reports.items()}
            if all(s == "ready" for s in statuses.values()):
                logger.info(f"Local GPU host ready in {time.monotonic() - started:.0f} s")
                self.died = stop_bot_if_it_dies(self._process, self._stopping)
                return
            failed = {n: r.get("error") for n, r in reports.items() if r and r.get("status") == "error"}
            if failed:
                raise RuntimeError(f"the local GPU host could not load: {failed}")
            now = time.monotonic()
            if not answered and now - started > timeout_s:
                raise TimeoutError(f"the local GPU host did not answer within {timeout_s:.0f} s")
            if now - reported >= report_every_s:
                reported = now
                summary = ", ".join(f"{n} {s}" for n, s in statuses.items())
                logger.info(f"Waiting for the local GPU host ({now - started:.0f} s): {summary}")
            time.sleep(0.5)

    def stop(self) -> None:
        self._stopping.set()
        if self._process is None or self._process.poll() is not None:
            return
        logger.info("Stopping the local GPU host")
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _progress(report: dict | None) -> str:
    if report is None:
        return "starting"
    return "queued" if report.get("queued") else report.get("status", "starting")


def _port_args(settings: AgentSettings) -> list[str]:
    return [
        *("--asr-port", str(urlsplit(settings.asr_url).port)),
        *("--tts-port", str(urlsplit(settings.tts_url).port)),
        *("--llm-port", str(urlsplit(settings.llm_url).port)),
    ]
