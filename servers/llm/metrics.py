"""Prometheus metrics of the LLM server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from servers.common.metrics import LATENCY_BUCKETS
from servers.llm.engine import LlmStepStats


class LlmMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # CPU time and memory, as the ASR and TTS servers report them
        self.requests = Counter("llm_requests", "Chat completion requests", ["finish_reason"], registry=r)
        self.active = Gauge("llm_requests_active", "Requests queued or running", registry=r)
        self.errors = Counter("llm_errors", "Requests refused or failed", ["code"], registry=r)
        self.unit_seconds = Histogram(
            "llm_unit_seconds", "Duration of one unit of work", ["kind"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "llm_queue_wait_seconds", "From a request arriving to its first unit", buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "llm_time_to_first_token_seconds",
            "From a request arriving to its first text",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("llm_prompt_tokens_evaluated", "Prompt tokens evaluated", registry=r)
        self.cached_tokens = Counter("llm_prompt_tokens_cached", "Prompt tokens reused from the cache", registry=r)
        self.completion_tokens = Counter("llm_completion_tokens", "Tokens generated", registry=r)

    def observe_step(self, stats: LlmStepStats | None) -> None:
        if stats is None:
            return
        self.unit_seconds.labels(kind="first" if stats.first else "more").observe(stats.seconds)
        if stats.queue_wait_s is not None:
            self.queue_wait.observe(stats.queue_wait_s)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.tokens)
