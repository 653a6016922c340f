"""Per-turn voice-to-voice latency: logged, kept, and sent to the client as metrics.

Pipecat's ``UserBotLatencyObserver`` measures each turn from the user's real end of speech
(the VAD's stop minus its stop window) to the bot starting to speak (the output
transport's first audio), with the services' TTFBs on the way. This turns that into one
log line per turn and a ``MetricsFrame`` the Playground graphs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from loguru import logger
from pipecat.frames.frames import Frame, MetricsFrame
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.observers.user_bot_latency_observer import LatencyBreakdown, UserBotLatencyObserver

VOICE_TO_VOICE = "voice-to-voice"
"""The processor name the turn's total is reported under."""


@dataclass(frozen=True)
class TurnLatency:
    turn: int
    voice_to_voice_s: float
    stages_s: dict[str, float] = field(default_factory=dict)
    """TTFB per service (ASR final transcript, LLM first token, TTS first audio)."""

    def line(self) -> str:
        stages = ", ".join(f"{name} {1000 * s:.0f} ms" for name, s in self.stages_s.items())
        return f"turn {self.turn}: voice-to-voice {1000 * self.voice_to_voice_s:.0f} ms" + (
            f" ({stages})" if stages else ""
        )


class TurnLatencyLog:
    """Listens to a ``UserBotLatencyObserver`` (the pipeline needs ``enable_metrics``)."""

    def __init__(self, observer: UserBotLatencyObserver, send: Callable[[Frame], Awaitable[None]] | None = None):
        """``send`` queues a frame into the pipeline (e.g. ``PipelineWorker.queue_frame``)."""
        self.turns: list[TurnLatency] = []
        self._send = send
        self._latency: float | None = None
        observer.add_event_handler("on_latency_measured", self._on_latency)
        observer.add_event_handler("on_latency_breakdown", self._on_breakdown)

    async def _on_latency(self, _observer, latency: float) -> None:
        self._latency = latency

    async def _on_breakdown(self, _observer, breakdown: LatencyBreakdown) -> None:
        latency, self._latency = self._latency, None
        if latency is None:
            return
        stages = {t.processor: t.duration_secs for t in breakdown.ttfb}
        turn = TurnLatency(len(self.turns) + 1, latency, stages)
        self.turns.append(turn)
        logger.info(turn.line())
        if self._send is not None:
            data = [TTFBMetricsData(processor=VOICE_TO_VOICE, value=latency)]
            await self._send(MetricsFrame(data=data))
