"""The ASR server's Prometheus metrics, fed the messages the server sends."""

from pipecat_nvidia.protocol import AsrTranscript
from servers.asr.metrics import AsrMetrics


def _final(latency_ms: float, rollover: bool) -> AsrTranscript:
    return AsrTranscript(
        text="hello", is_final=True, utterance_id=0, audio_ms=900.0, rollover=rollover, latency_ms=latency_ms
    )


def test_only_finals_that_answer_a_reset_count_as_final_latency():
    metrics = AsrMetrics()
    metrics.observe_transcript(_final(400.0, rollover=True))
    metrics.observe_transcript(_final(12.0, rollover=False))
    assert metrics.registry.get_sample_value("asr_final_latency_seconds_count") == 1
    assert metrics.registry.get_sample_value("asr_final_latency_seconds_sum") == 0.012
