"""Per-turn voice-to-voice latency: logged, kept, and sent to the client as metrics.

Pipecat's ``UserBotLatencyObserver`` measures each turn from the user's real end of speech
(the VAD's stop minus its stop window) to the bot starting to speak (the output
transport's first audio), and names the parts that time went on. This turns that into
one log line per turn and a ``MetricsFrame`` the Playground graphs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from loguru import logger
from pipecat.frames.frames import Frame, MetricsFrame
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.observers.user_bot_latency_observer import LatencyBreakdown, UserBotLatencyObserver

VOICE_TO_VOICE = "voice-to-voice"
"""The processor name the turn's total is reported under."""


@dataclass(frozen=True)
class TurnPart:
    """One named stretch of a turn's latency."""

    label: str
    """What the time went on: ``endpointing wait``, ``transcription``, ``LLM inference``,
    ``function handler``, ``speech synthesis``, …"""
    owner: str
    """Who spent it: a processor (``NemotronLLMService#0``) or a setting (``config: …``)."""
    seconds: float


@dataclass(frozen=True)
class TurnLatency:
    turn: int
    voice_to_voice_s: float
    parts: tuple[TurnPart, ...] = ()
    """Where the time went, in order (Pipecat's contributions, which add up to the whole):
    every part, so a turn with a tool call shows both of its LLM requests."""

    @classmethod
    def of(cls, turn: int, voice_to_voice_s: float, breakdown: LatencyBreakdown) -> TurnLatency:
        parts = tuple(TurnPart(c.label, c.owner, c.duration_secs) for c in breakdown.contributions)
        return cls(turn, voice_to_voice_s, parts)

    def line(self) -> str:
        parts = ", ".join(f"{p.label} {1000 * p.seconds:.0f} ms [{p.owner}]" for p in self.parts)
        return f"turn {self.turn}: voice-to-voice {1000 * self.voice_to_voice_s:.0f} ms" + (
            f" ({parts})" if parts else ""
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
        turn = TurnLatency.of(len(self.turns) + 1, latency, breakdown)
        self.turns.append(turn)
        logger.info(turn.line())
        if self._send is not None:
            data = [TTFBMetricsData(processor=VOICE_TO_VOICE, value=latency)]
            await self._send(MetricsFrame(data=data))
