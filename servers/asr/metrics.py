"""Prometheus metrics of the ASR server."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from pipecat_nvidia.protocol import AsrTranscript
from servers.asr.engine import StepStats
from servers.common.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, ServerMetrics


class AsrMetrics(ServerMetrics):
    def __init__(self) -> None:
        super().__init__("asr", "ASR")
        r = self.registry
        self.batch_size = Histogram("asr_batch_size", "Rows per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram(
            "asr_step_seconds", "Duration of one engine step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.chunk_latency = Histogram(
            "asr_chunk_latency_seconds",
            "From a chunk's last audio arriving to the end of the step that transcribed it",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.interim_latency = Histogram(
            "asr_interim_latency_seconds",
            "From a chunk's last audio arriving to its interim transcript",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.final_latency = Histogram(
            "asr_final_latency_seconds",
            "From a reset arriving to the final transcript",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter("asr_audio_seconds", "Audio received", registry=r)
        self.audio_messages = Counter(
            "asr_audio_messages", "Audio messages received (each costs server CPU, whatever its size)", registry=r
        )

    def observe_step(self, stats: StepStats) -> None:
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
            self.step_seconds.observe(stats.seconds)
        for latency in stats.chunk_latencies:
            self.chunk_latency.observe(latency)

    def observe_transcript(self, message: AsrTranscript) -> None:
        if not message.is_final:
            self.interim_latency.observe(message.latency_ms / 1000.0)
        elif not message.rollover:  # a rollover answers no reset: its wait began at a chunk
            self.final_latency.observe(message.latency_ms / 1000.0)
