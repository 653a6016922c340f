"""The LLM server's Prometheus metrics."""

from servers.llm.metrics import LlmMetrics


def test_a_wait_behind_a_whole_answer_lands_in_a_bucket_of_its_size():
    """The server runs one request at a time: a queued one waits seconds, and a quantile
    over buckets that end at 2.5 s would read any such wait as 2.5 s."""
    metrics = LlmMetrics()
    metrics.queue_wait.observe(7.0)
    assert metrics.registry.get_sample_value("llm_queue_wait_seconds_bucket", {"le": "5.0"}) == 0
    assert metrics.registry.get_sample_value("llm_queue_wait_seconds_bucket", {"le": "10.0"}) == 1
