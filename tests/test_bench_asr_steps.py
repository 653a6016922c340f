"""The in-process ASR step benchmark on the tiny model (harness check, not a measurement)."""

from bench.asr_steps import step_times
from tests.asr.helpers import make_engine


def test_steps_that_carry_every_session_are_timed_and_sessions_are_closed(tiny_asr_path):
    engine = make_engine(tiny_asr_path, max_sessions=3)
    times = step_times(engine, batch=3, seconds=2.0, timeout_s=120)
    # 2 s at 160 ms chunks: a first chunk, ~11 steady ones, a final one; steady ones count.
    assert 8 <= len(times) <= 12
    assert all(t > 0 for t in times)
    assert engine.session_count == 0
