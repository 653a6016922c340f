"""Finding speech in a recorded channel, for the waveform latency measurement."""

import numpy as np
import pytest

from bench.conversation import RATE, Recording, measure, speech_regions


def tone(seconds: float) -> np.ndarray:
    return (8000 * np.sin(np.arange(int(seconds * RATE)) / 5)).astype(np.int16)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.int16)


def test_speech_regions_find_the_sound():
    [(start, end)] = speech_regions(np.concatenate([silence(1), tone(1), silence(1)]))
    assert start == pytest.approx(1.0, abs=0.02) and end == pytest.approx(2.0, abs=0.02)


def test_gaps_are_measured_from_the_waveforms():
    user = np.concatenate([silence(1), tone(1), silence(3), tone(1), silence(2)])
    bot = np.concatenate([silence(2.5), tone(3.2), silence(0.7), tone(0.6), silence(1.0)])
    gaps = measure(Recording(user=user, bot=bot))
    assert gaps.response_s == pytest.approx([0.5, 0.4], abs=0.02)
    assert gaps.barge_in_stop_s == pytest.approx([0.7], abs=0.02)
