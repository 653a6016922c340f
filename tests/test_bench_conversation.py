"""Finding speech in a recorded channel, for the waveform latency measurement."""

import asyncio
import time

import numpy as np
import pytest
from pipecat.frames.frames import OutputAudioRawFrame
from pipecat.serializers.protobuf import ProtobufFrameSerializer
from websockets.asyncio.server import serve

from bench.conversation import FRAME, RATE, Recording, Turn, converse, measure, speech_regions


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


async def test_user_audio_is_sent_as_spoken_and_the_bots_is_placed_where_it_arrived():
    """Gaps are read off the two waveforms: user audio sent before it was spoken, or a bot
    piece placed before it arrived, would shorten every response gap."""
    heard: list[float] = []
    answered: list[float] = []

    async def bot(ws):
        serializer = ProtobufFrameSerializer()
        async for message in ws:
            frame = await serializer.deserialize(message)
            if frame is not None and not heard and np.frombuffer(frame.audio, np.int16).any():
                heard.append(time.monotonic())
                await asyncio.sleep(0.5)
                answered.append(time.monotonic())
                await ws.send(await serializer.serialize(OutputAudioRawFrame(tone(0.04).tobytes(), RATE, 1)))

    async with serve(bot, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        started = time.monotonic()
        recording = await converse(f"ws://127.0.0.1:{port}", [Turn(tone(0.5), 1.0)], lead_in_s=0.5, tail_s=0.5)
    user_start = speech_regions(recording.user)[0][0]
    bot_start = speech_regions(recording.bot)[0][0]
    frame_s = FRAME / RATE
    assert heard[0] - started >= user_start + frame_s - 0.005, "the first speech frame came once it was spoken"
    # On the recording's timeline the first speech frame was heard at user_start + frame_s.
    assert bot_start - (user_start + frame_s) == pytest.approx(answered[0] - heard[0], abs=0.015)
