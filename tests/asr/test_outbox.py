import asyncio
import threading

from pipecat_nvidia.protocol import AsrTranscript, ErrorCode, ErrorMessage
from servers.asr.config import AsrServerSettings
from servers.asr.server import AsrServer
from servers.common.ws_server import Deliveries, Outbox


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


async def test_messages_posted_from_an_engine_thread_reach_their_outboxes_in_order():
    outboxes = [Outbox(), Outbox()]
    deliveries = Deliveries(asyncio.get_running_loop())

    def engine_thread():
        for i in range(200):
            deliveries.post(outboxes[i % 2], _transcript(str(i)))

    thread = threading.Thread(target=engine_thread)
    thread.start()
    received = [[(await asyncio.wait_for(o.get(), 1)).text for _ in range(100)] for o in outboxes]
    thread.join()
    assert received == [[str(i) for i in range(k, 200, 2)] for k in (0, 1)]


async def test_a_burst_of_messages_wakes_the_event_loop_once(monkeypatch):
    loop = asyncio.get_running_loop()
    wakeups = []
    schedule = loop.call_soon_threadsafe
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a: wakeups.append(a) or schedule(*a))
    outboxes = [Outbox() for _ in range(300)]
    deliveries = Deliveries(loop)
    for i, outbox in enumerate(outboxes):
        deliveries.post(outbox, _transcript(str(i)))
    received = [(await asyncio.wait_for(o.get(), 1)).text for o in outboxes]
    assert received == [str(i) for i in range(300)]
    assert len(wakeups) == 1
