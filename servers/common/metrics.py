"""Prometheus metrics every server has; each server adds its own (one registry per server,
so that servers can share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

LATENCY_BUCKETS = (
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
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Seconds: a step's few milliseconds up to a request's wait behind a whole answer."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class ServerMetrics:
    def __init__(self, prefix: str, kind: str) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # CPU time and memory: what the I/O costs shows here
        self.sessions = Gauge(f"{prefix}_sessions_active", f"Open {kind} sessions", registry=self.registry)
        self.sessions_total = Counter(f"{prefix}_sessions", f"{kind} sessions opened", registry=self.registry)
        self.errors = Counter(f"{prefix}_errors", "Errors sent to clients", ["code"], registry=self.registry)

    def observe_step(self, stats: Any) -> None:
        """Record one engine step (the worker calls this after each)."""
