"""What the TTS server does with a connection's unsent messages."""

import asyncio

from pipecat_nvidia.protocol import TtsAudio, TtsCancelled, TtsSegmentDone
from servers.common.ws_server import Outbox
from servers.tts.config import TtsServerSettings
from servers.tts.server import TtsServer


def _audio(context_id: str) -> TtsAudio:
    return TtsAudio.from_pcm(bytes(4), context_id=context_id, segment_id="0", sample_rate=22050)


def _segment_done(context_id: str) -> TtsSegmentDone:
    return TtsSegmentDone(
        context_id=context_id,
        segment_id="0",
        audio_ms=1000.0,
        first_audio_ms=50.0,
        decoder_steps=20,
        stopped_by="end_of_speech",
    )


async def test_a_cancelled_turns_unsent_audio_and_its_count_are_dropped():
    outbox = Outbox(TtsServer(TtsServerSettings()).put_policy)
    for message in (_audio("a"), _audio("b"), _segment_done("a"), _segment_done("b"), TtsCancelled(context_id="a")):
        outbox.put(message)
    received = [await asyncio.wait_for(outbox.get(), 1) for _ in range(3)]
    assert [(m.type, m.context_id) for m in received] == [("audio", "b"), ("segment_done", "b"), ("cancelled", "a")]
