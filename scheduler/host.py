"""The local GPU host: ASR, TTS and LLM servers in one process, on one GPU scheduler.

Each server keeps its own port, protocol, ``/health`` and ``/metrics`` exactly as when it
runs alone; only the driver differs: every loaded engine is handed to the shared
scheduler instead of getting its own thread. The scheduler's metrics are served with
the LLM's (``/metrics`` on its port).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from loguru import logger

from scheduler.policy import Targets
from scheduler.worker import GpuScheduler
from servers.asr.config import AsrServerSettings
from servers.asr.server import AsrServer
from servers.llm.config import LlmServerSettings
from servers.llm.server import LlmServer
from servers.tts.config import TtsServerSettings
from servers.tts.server import TtsServer


def _local_asr() -> AsrServerSettings:
    """A local agent serves a few streams: 16 sessions and CUDA graphs for up to 16 keep
    the memory the ASR reserves at start-up (session state, graphs) small beside the LLM."""
    return AsrServerSettings(max_sessions=16, cuda_graph_max_batch=16)


def _local_tts() -> TtsServerSettings:
    """Likewise for the TTS: 16 segments per step bound its key/value cache (reserved at
    start-up) and its graphs."""
    return TtsServerSettings(max_batch=16, cuda_graph_max_batch=16)


@dataclass(frozen=True)
class HostSettings:
    asr: AsrServerSettings = field(default_factory=_local_asr)
    tts: TtsServerSettings = field(default_factory=_local_tts)
    llm: LlmServerSettings = field(default_factory=LlmServerSettings)
    targets: Targets = field(default_factory=Targets)
    log_level: str = "INFO"


class LocalGpuHost:
    kind = "GPU host"

    def __init__(self, settings: HostSettings):
        self.settings = settings
        self.scheduler = GpuScheduler(settings.targets)
        self.asr = AsrServer(settings.asr, driver=self.scheduler.driver("asr"))
        self.tts = TtsServer(settings.tts, driver=self.scheduler.driver("tts"))
        self.llm = LlmServer(settings.llm, driver=self.scheduler.driver("llm"))
        self.scheduler.metrics.expose_in(self.llm.metrics.registry)

    @property
    def servers(self):
        return (self.asr, self.tts, self.llm)

    async def start(self) -> None:
        """Every port first: one that is taken ends the host before any model loads."""
        for server in self.servers:
            await server.listen()
        for server in self.servers:
            server.start_loading()

    async def wait_loaded(self) -> None:
        await asyncio.gather(*(server.wait_loaded() for server in self.servers))

    async def stop(self) -> None:
        """The LLM first: its open requests end only through steps, so the scheduler (which
        the first server to stop stops) must still run while it closes."""
        for server in reversed(self.servers):
            try:
                await server.stop()
            except Exception:  # noqa: BLE001 - the others must still stop (and abandon their loads)
                logger.exception(f"Stopping the {server.kind} server failed")
