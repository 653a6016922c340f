"""The local voice agent: ``python bot.py``, then open http://localhost:7860/client.

With no ``NVIDIA_ASR_URL`` / ``NVIDIA_TTS_URL`` / ``NVIDIA_LLM_URL`` set, it first starts
the local GPU host (ASR, TTS and LLM on one GPU; models download on first run) and stops
it on exit; otherwise it uses those servers. Every transport of Pipecat's runner works as
in Pipecat's examples (``-t daily``, ``-t twilio``, a WebSocket client at ``/ws-client``,
Pipecat's eval harness at ``/ws``, …;
credentials from the environment or ``.env``). Settings: ``.env.example``.
"""

from __future__ import annotations

import argparse
import atexit
import sys
from typing import TYPE_CHECKING

from dotenv import load_dotenv
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

from pipecat_nvidia.agent import AgentSettings, build_agent

if TYPE_CHECKING:
    from pipecat_nvidia.local_host import LocalHost


def _transport_params() -> dict:
    """Parameters for each transport the runner may hand the bot (without ``-t`` it serves
    every one whose packages are installed)."""
    from pipecat.runner.run import TELEPHONY_TRANSPORTS

    def audio() -> TransportParams:
        return TransportParams(audio_in_enabled=True, audio_out_enabled=True)

    def daily():
        from pipecat.transports.daily.transport import DailyParams

        return DailyParams(audio_in_enabled=True, audio_out_enabled=True)

    def livekit():
        from pipecat.transports.livekit.transport import LiveKitParams

        return LiveKitParams(audio_in_enabled=True, audio_out_enabled=True)

    def websocket_client():
        from pipecat.serializers.protobuf import ProtobufFrameSerializer
        from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams

        return FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=ProtobufFrameSerializer()
        )

    def evaluation():
        from pipecat.evals.transport import EvalTransportParams

        # The runner sets the eval harness's serializer.
        return EvalTransportParams(audio_in_enabled=True, audio_out_enabled=True)

    def telephony():
        from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams

        # The runner sets the provider's serializer.
        return FastAPIWebsocketParams(audio_in_enabled=True, audio_out_enabled=True)

    return {
        "webrtc": audio,
        "moq": audio,
        "daily": daily,
        "livekit": livekit,
        "websocket": websocket_client,
        "eval": evaluation,
        **dict.fromkeys(TELEPHONY_TRANSPORTS, telephony),
    }


async def bot(runner_args: RunnerArguments):
    """The Pipecat runner's entry point: one call per session."""
    transport = await create_transport(runner_args, _transport_params())
    agent = build_agent(transport, AgentSettings.from_env())
    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(agent.worker)
    await runner.run()


def _runner_listens(args: argparse.Namespace) -> bool:
    """Whether the runner serves on ``--host``/``--port``: not where it joins a session
    itself (Daily with ``--direct``, Vonage)."""
    return not args.direct and args.transport != "vonage"


def _start_local_host(settings: AgentSettings, args: argparse.Namespace) -> LocalHost:
    """Before the minutes of loading: refuse a runner port that is taken, which the
    runner itself would find only afterwards."""
    from pipecat_nvidia.local_host import LocalHost, port_in_use

    if _runner_listens(args) and port_in_use(args.host, args.port):
        sys.exit(f"Port {args.port} is taken (another bot?): stop it, or choose another with --port")
    host = LocalHost(settings)
    atexit.register(host.stop)
    try:
        host.start()
        host.wait_ready()
    except (RuntimeError, TimeoutError) as e:
        sys.exit(f"The local GPU host cannot serve the agent: {e}")
    except KeyboardInterrupt:
        sys.exit("Stopped while the local GPU host was starting")
    return host


class _StartsTheHostOnceParsed(argparse.ArgumentParser):
    """The parser Pipecat's runner adds its arguments to: the local host starts once they
    parse, so a mistyped one (or ``--help``) costs no loading, and the port they give the
    runner is checked before it."""

    def __init__(self, settings: AgentSettings):
        super().__init__(description="pipecat-nvidia voice agent (Pipecat's development runner)")
        self._settings = settings
        self.host: LocalHost | None = None

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if self._settings.uses_local_host:
            self.host = _start_local_host(self._settings, parsed)
        return parsed


def main() -> None:
    from pipecat.runner.run import main as run_runner

    load_dotenv(override=True)  # here, not on import: a module importing this one keeps its environment
    parser = _StartsTheHostOnceParsed(AgentSettings.from_env())
    run_runner(parser)
    if parser.host is not None and parser.host.died.is_set():
        # A supervisor that restarts a failed bot must see this as a failure.
        sys.exit("The bot stopped because its local GPU host died")


if __name__ == "__main__":
    main()
