"""The local voice agent: ``python bot.py``, then open http://localhost:7860/client.

With no ``NVIDIA_ASR_URL`` / ``NVIDIA_TTS_URL`` / ``NVIDIA_LLM_URL`` set, it first starts
the local GPU host (ASR, TTS and LLM on one GPU; models download on first run) and stops
it on exit; otherwise it uses those servers. ``-t daily`` and ``-t twilio`` work as in
Pipecat's examples (credentials from the environment or ``.env``). Settings:
``.env.example``.
"""

from __future__ import annotations

import argparse
import atexit
import sys

from dotenv import load_dotenv
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from pipecat_nvidia.agent import AgentSettings, build_agent

load_dotenv(override=True)


def _transport_params() -> dict:
    def daily():
        from pipecat.transports.daily.transport import DailyParams

        return DailyParams(audio_in_enabled=True, audio_out_enabled=True)

    def websocket():
        from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams

        return FastAPIWebsocketParams(audio_in_enabled=True, audio_out_enabled=True)

    return {
        "webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True),
        "daily": daily,
        "twilio": websocket,
    }


async def bot(runner_args: RunnerArguments):
    """The Pipecat runner's entry point: one call per session."""
    transport = await create_transport(runner_args, _transport_params())
    agent = build_agent(transport, AgentSettings.from_env())
    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(agent.worker)
    await runner.run()


def _runner_address(argv: list[str]) -> tuple[str, int] | None:
    """Where the Pipecat runner will listen (None with ``--direct``: it will not)."""
    from pipecat.runner.run import RUNNER_HOST, RUNNER_PORT

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host", default=RUNNER_HOST)
    p.add_argument("--port", type=int, default=RUNNER_PORT)
    p.add_argument("-d", "--direct", action="store_true")
    args, _ = p.parse_known_args(argv)
    return None if args.direct else (args.host, args.port)


def _start_local_host(settings: AgentSettings) -> None:
    """Before the minutes of loading: refuse a runner port that is taken, which the
    runner itself would find only afterwards."""
    from pipecat_nvidia.local_host import LocalHost, port_in_use

    address = _runner_address(sys.argv[1:])
    if address is not None and port_in_use(*address):
        sys.exit(f"Port {address[1]} is taken (another bot?): stop it, or choose another with --port")
    host = LocalHost(settings)
    atexit.register(host.stop)
    try:
        host.start()
        host.wait_ready()
    except (RuntimeError, TimeoutError) as e:
        sys.exit(f"The local GPU host cannot serve the agent: {e}")
    except KeyboardInterrupt:
        sys.exit("Stopped while the local GPU host was starting")


def main() -> None:
    from pipecat.runner.run import main as run_runner

    settings = AgentSettings.from_env()
    asking_for_help = any(arg in ("-h", "--help") for arg in sys.argv[1:])
    if settings.uses_local_host and not asking_for_help:
        _start_local_host(settings)
    run_runner()


if __name__ == "__main__":
    main()
