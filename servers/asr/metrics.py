"""Prometheus metrics of one ASR server (its own registry, so servers can share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipecat_nvidia.protocol import AsrTranscript, ErrorCode
from servers.asr.engine import StepStats

_LATENCY_BUCKETS = (
    0.002,
    0.004,
    0.006,
    0.008,
    0.01,
    0.0125,
    0.015,
    0.0175,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.06,
    0.08,
    0.1,
    0.12,
    0.14,
    0.16,
    0.2,
    0.25,
    0.32,
    0.5,
    1.0,
    2.5,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class AsrMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("asr_sessions_active", "Open ASR sessions", registry=r)
        self.sessions_total = Counter("asr_sessions", "ASR sessions opened", registry=r)
        self.batch_size = Histogram("asr_batch_size", "Rows per engine step", buckets=_BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram(
            "asr_step_seconds", "Duration of one engine step", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.chunk_latency = Histogram(
            "asr_chunk_latency_seconds",
            "From a chunk's last audio arriving to the end of the step that transcribed it",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.interim_latency = Histogram(
            "asr_interim_latency_seconds",
            "From a chunk's last audio arriving to its interim transcript",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.final_latency = Histogram(
            "asr_final_latency_seconds",
            "From a reset arriving to the final transcript",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter("asr_audio_seconds", "Audio received", registry=r)
        self.errors = Counter("asr_errors", "Errors sent to clients", ["code"], registry=r)

    def observe_step(self, stats: StepStats) -> None:
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
            self.step_seconds.observe(stats.seconds)
        for latency in stats.chunk_latencies:
            self.chunk_latency.observe(latency)

    def observe_transcript(self, message: AsrTranscript) -> None:
        histogram = self.final_latency if message.is_final else self.interim_latency
        histogram.observe(message.latency_ms / 1000.0)

    def observe_error(self, code: ErrorCode) -> None:
        self.errors.labels(code=code.value).inc()
