"""Driving a TTS engine synchronously and reading what it sent."""

from __future__ import annotations

import numpy as np

from pipecat_nvidia.protocol import TtsSpeak
from servers.tts.engine import TTSEngine
from servers.tts.model import SamplingSettings, load_magpie


def make_tts_engine(path, **kwargs) -> TTSEngine:
    """Greedy sampling, so that the same text always gives the same audio."""
    return TTSEngine(load_magpie(str(path), device="cpu", sampling=SamplingSettings(temperature=0.0)), **kwargs)


def pcm(messages, context_id: str | None = None, segment_id: str | None = None) -> np.ndarray:
    """The int16 audio of the ``audio`` messages (of one context / segment)."""
    pieces = [
        m.pcm
        for m in messages
        if m.type == "audio" and context_id in (None, m.context_id) and segment_id in (None, m.segment_id)
    ]
    return np.frombuffer(b"".join(pieces), "<i2")


def synthesize(engine: TTSEngine, text: str, **speak) -> list:
    """Everything one session gets for one flushed segment."""
    messages = []
    sid = engine.open_session(messages.append)
    engine.speak(sid, TtsSpeak(context_id="c", text=text, **speak))
    engine.flush(sid, "c")
    engine.run_until_idle()
    engine.close_session(sid)
    return messages


def assert_same_audio(actual: np.ndarray, expected: np.ndarray) -> None:
    """The same audio up to chunking: a segment's frames may be decoded in other pieces
    (with the codec's receptive field as context, as when audio is sent early because the
    listener would run dry; that depends on timing), which changes a sample by at most
    rounding, 1 LSB."""
    assert len(actual) == len(expected) > 0
    assert np.abs(actual.astype(int) - expected).max() <= 1
