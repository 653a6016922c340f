"""StepAlignedAudio: audio leaves the client exactly when the server could step on it."""

import numpy as np
import pytest

from pipecat_nvidia.step_audio import StepAlignedAudio

FRAME = 320  # 20 ms at 16 kHz, as Pipecat transports deliver it


def _frames(count: int, size: int = FRAME) -> list[bytes]:
    samples = np.arange(count * size, dtype=np.int16)
    return [samples[i * size : (i + 1) * size].tobytes() for i in range(count)]


def _sent_at(held: StepAlignedAudio, frames: list[bytes]) -> list[int]:
    """Utterance sample counts at which audio was sent."""
    total, sends = 0, []
    for frame in frames:
        total += len(frame) // 2
        if held.add(frame):
            sends.append(total)
    return sends


def test_audio_is_sent_with_the_first_frame_that_reaches_each_boundary():
    sends = _sent_at(StepAlignedAudio(1536, 2560), _frames(50))
    boundaries = [1536 + k * 2560 for k in range(6)]
    assert sends == [FRAME * -(-b // FRAME) for b in boundaries]


def test_every_byte_is_sent_once_and_in_order():
    held = StepAlignedAudio(1536, 2560)
    frames = _frames(37)
    sent = b"".join(held.add(f) for f in frames) + held.end_utterance()
    assert sent == b"".join(frames)


def test_the_next_utterance_counts_from_zero_after_a_reset():
    held = StepAlignedAudio(1536, 2560)
    _sent_at(held, _frames(11))
    assert held.end_utterance()
    assert _sent_at(held, _frames(20)) == _sent_at(StepAlignedAudio(1536, 2560), _frames(20))


def test_a_frame_spanning_several_boundaries_is_sent_whole_and_the_count_goes_on():
    held = StepAlignedAudio(1536, 2560)
    assert len(held.add(bytes(2 * 6000))) == 12000  # past 1536 and 4096
    assert held.add(bytes(2 * 600)) == b""  # 6600 < 6656
    assert held.add(bytes(2 * 100))  # 6700 >= 6656


def test_nonsense_boundaries_are_refused():
    with pytest.raises(ValueError):
        StepAlignedAudio(0, 2560)
