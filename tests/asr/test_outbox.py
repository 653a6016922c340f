import asyncio

from pipecat_nvidia.protocol import AsrTranscript, ErrorCode, ErrorMessage
from servers.asr.config import AsrServerSettings
from servers.asr.server import AsrServer
from servers.common.ws_server import Outbox


def _transcript(text, final=False, utterance=0):
    return AsrTranscript(text=text, is_final=final, utterance_id=utterance, audio_ms=0, latency_ms=0)


async def test_a_slow_reader_gets_the_latest_interim_and_every_final_and_error():
    outbox = Outbox(AsrServer(AsrServerSettings()).put_policy)
    for message in (
        _transcript("a"),
        _transcript("ab"),
        _transcript("abc"),
        ErrorMessage(code=ErrorCode.BAD_AUDIO, message="odd"),
        _transcript("abcd"),
        _transcript("abcd e", final=True),
        _transcript("x", utterance=1),
        _transcript("xy", utterance=1),
    ):
        outbox.put(message)
    received = [await asyncio.wait_for(outbox.get(), 1) for _ in range(5)]
    assert [getattr(m, "text", None) for m in received] == ["abc", None, "abcd", "abcd e", "xy"]
