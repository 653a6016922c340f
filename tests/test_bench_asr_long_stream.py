"""The long-stream ASR benchmark on the tiny model (harness check, not a measurement)."""

from bench.asr_long_stream import step_times_by_minute, summary
from tests.asr.helpers import make_engine


def test_every_chunk_of_the_stream_is_timed_by_its_minute_and_the_session_closed(tiny_asr_path):
    engine = make_engine(tiny_asr_path, max_sessions=1)
    by_minute = step_times_by_minute(engine, minutes=1)
    # A minute at 160 ms steps: 375 steps (the first chunk is shorter, so one may slip).
    assert 374 <= len(by_minute[0]) <= 376
    assert engine.session_count == 0


def test_the_summary_compares_the_last_minutes_median_step_with_the_first():
    result = summary([[0.001, 0.001, 0.003], [0.002, 0.002]])
    assert result["steps"] == 5 and result["step_ms_p50_by_minute"] == [1.0, 2.0]
    assert result["last_over_first"] == 2.0
