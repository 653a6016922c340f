"""The in-process TTS step benchmark on the tiny model (harness check, not a measurement)."""

from bench.tts_steps import TEXT, decoder_steps
from tests.tts.helpers import make_tts_engine


def test_pure_decoder_steps_that_carry_every_segment_are_kept_and_sessions_are_closed(tiny_tts_path):
    engine = make_tts_engine(tiny_tts_path, max_frames_per_token=1.0)
    steps = decoder_steps(engine, batch=3, text=TEXT, timeout_s=120)
    assert len(steps) > 20
    assert all(s.batch_size == 3 and not s.started and s.audio_seconds == 0 and s.seconds > 0 for s in steps)
    assert engine.session_count == 0 and not engine.has_work()
