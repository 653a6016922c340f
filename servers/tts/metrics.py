"""Prometheus metrics of the TTS server."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from servers.common.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, ServerMetrics
from servers.tts.engine import TtsStepStats

_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 4.0)


class TtsMetrics(ServerMetrics):
    def __init__(self) -> None:
        super().__init__("tts", "TTS")
        r = self.registry
        self.batch_size = Histogram("tts_batch_size", "Segments per decoder step", buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram(
            "tts_step_seconds", "Duration of one engine step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.realtime_factor = Histogram(
            "tts_realtime_factor",
            "Step time over the audio a step adds to each segment (below 1: every segment keeps ahead of playout)",
            buckets=_RTF_BUCKETS,
            registry=r,
        )
        self.first_audio = Histogram(
            "tts_first_audio_seconds",
            "From a turn's first text to its first audio (later segments of a turn are not counted)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter("tts_audio_seconds", "Audio synthesized (model rate)", registry=r)
        self.playout_gaps = Counter(
            "tts_playout_gaps",
            "Times a turn's listener ran out of audio before more came, by what was late: "
            "the synthesis, or the segment's text",
            ["late"],
            registry=r,
        )

    def observe_step(self, stats: TtsStepStats) -> None:
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
            self.step_seconds.observe(stats.seconds)
            self.realtime_factor.observe(stats.seconds / stats.step_audio_seconds)
        self.audio_seconds.inc(stats.audio_seconds)
        for latency in stats.first_audio_latencies:
            self.first_audio.observe(latency)
        if stats.synthesis_gaps:
            self.playout_gaps.labels(late="synthesis").inc(stats.synthesis_gaps)
        if stats.text_gaps:
            self.playout_gaps.labels(late="text").inc(stats.text_gaps)
