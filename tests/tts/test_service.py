"""MagpieTTSService in a real pipeline against a real TTS server (tiny, greedy model)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.tts_service import TextAggregationMode
from pipecat.utils.errors import ErrorCategory

from pipecat_nvidia.tts import MagpieTTSService
from servers.tts.config import TtsServerSettings
from servers.tts.server import TtsServer
from tests.asr.client import server_url
from tests.loaded_server import slow_down
from tests.pipeline import Clock, FrameLog, run_worker

pytestmark = pytest.mark.slow

SENTENCES = ["Good morning to you. ", "The weather is fine today. ", "See you later. "]


def record_speak(server) -> list:
    """Remember the segments the server's engine is asked to speak (then speak them)."""
    requests = []
    speak = server.engine.speak

    def recording(sid, request):
        requests.append(request)
        return speak(sid, request)

    server.engine.speak = recording
    return requests


def _turn(sentences):
    return [LLMFullResponseStartFrame(), *(LLMTextFrame(text=s) for s in sentences), LLMFullResponseEndFrame()]


UNFINISHED = "This is a rather long sentence that the bot will not get to finish. "


def _speak_then_lose_the_server(server, tts, sentences: list[str], *, wait_s: float):
    """A step for :func:`run_turns`: speak a turn, stop the server once its audio flows,
    then wait up to ``wait_s`` for the turn's stop frame."""

    async def step(sink):
        for frame in _turn(sentences):
            await tts.queue_frame(frame)
        while not sink.of(TTSAudioRawFrame):
            await asyncio.sleep(0.01)
        await server.stop()
        for _ in range(round(wait_s / 0.02)):
            if sink.of(TTSStoppedFrame):
                break
            await asyncio.sleep(0.02)

    return step


async def play(queue, sink: FrameLog, frames: list) -> None:
    """Queue a turn's ``frames`` (``queue``: a worker's or the service's ``queue_frame``) and
    wait until its audio has stopped."""
    before = len(sink.of(TTSStoppedFrame))
    for frame in frames:
        await queue(frame)
    while len(sink.of(TTSStoppedFrame)) == before:
        await asyncio.sleep(0.02)


async def run_turns(tts, *steps, sample_rate: int = 24000, head: FrameLog | None = None) -> FrameLog:
    """Feed each step (a list of frames, or a coroutine function to await) once the
    previous turn's audio has stopped, then end the pipeline. ``head`` logs what comes
    upstream out of the service (errors)."""
    clock = Clock()
    sink = FrameLog(clock)

    async def feed(worker):
        while tts.ready is None:
            await asyncio.sleep(0.01)
        for step in steps:
            if callable(step):
                await step(sink)
            else:
                await play(worker.queue_frame, sink, step)
        await worker.queue_frame(EndFrame())

    params = PipelineParams(audio_out_sample_rate=sample_rate, enable_metrics=True, enable_usage_metrics=True)
    await run_worker([head or FrameLog(clock), tts, sink], feed, params)
    return sink


def test_token_aggregation_is_refused_because_every_token_would_be_a_segment():
    with pytest.raises(ValueError, match="SENTENCE"):
        MagpieTTSService(text_aggregation_mode=TextAggregationMode.TOKEN)


async def test_a_turns_first_sentence_is_streamed_and_the_rest_batched(start_tts_server):
    server = await start_tts_server()
    requests = record_speak(server)
    tts = MagpieTTSService(url=server_url(server))
    sink = await run_turns(tts, _turn(SENTENCES))
    assert [r.mode for r in requests] == ["stream", "batch", "batch"]
    assert len({r.context_id for r in requests}) == 1 and all(r.sample_rate == 24000 for r in requests)
    kinds = [
        type(e.frame) for e in sink.events if isinstance(e.frame, (TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame))
    ]
    assert kinds[0] is TTSStartedFrame and kinds[-1] is TTSStoppedFrame and kinds.count(TTSAudioRawFrame) > 3
    audio = [e.frame for e in sink.of(TTSAudioRawFrame)]
    assert all(f.sample_rate == 24000 for f in audio)
    seconds = sum(len(f.audio) for f in audio) / 2 / 24000
    assert seconds > 2.0


async def test_the_mode_can_be_set_to_batch_or_stream(start_tts_server):
    server = await start_tts_server()
    requests = record_speak(server)
    tts = MagpieTTSService(url=server_url(server), settings=MagpieTTSService.Settings(mode="batch", voice="1"))
    await run_turns(tts, _turn(SENTENCES[:2]))
    assert [(r.mode, r.voice) for r in requests] == [("batch", "1"), ("batch", "1")]


async def test_ttfb_and_usage_are_reported_under_the_servers_model(start_tts_server):
    server = await start_tts_server()
    tts = MagpieTTSService(url=server_url(server))
    sink = await run_turns(tts, _turn(SENTENCES[:2]))
    ours = [d for e in sink.of(MetricsFrame)[1:] for d in e.frame.data if d.processor == tts.name]
    assert {m.model for m in ours} == {server.settings.model}
    ttfb = [m.value for m in ours if isinstance(m, TTFBMetricsData)]
    usage = [m.value for m in ours if isinstance(m, TTSUsageMetricsData)]
    assert len(ttfb) == 1 and 0 < ttfb[0] < 5
    assert sum(usage) == sum(len(s.strip()) for s in SENTENCES[:2])


async def test_barge_in_cancels_the_turn_on_the_server_and_drops_its_audio(start_tts_server):
    server = await start_tts_server()
    tts = MagpieTTSService(url=server_url(server), settings=MagpieTTSService.Settings(mode="stream"))
    long_turn = _turn(["This is a rather long sentence that the bot will not get to finish. "] * 2)
    interrupted_at = []

    async def speak_then_interrupt(sink):
        for frame in long_turn:
            await tts.queue_frame(frame)
        while not sink.of(TTSAudioRawFrame):
            await asyncio.sleep(0.01)
        await tts.queue_frame(InterruptionFrame())
        interrupted_at.append(len(sink.events))
        await asyncio.sleep(1.0)

    sink = await run_turns(tts, speak_then_interrupt, _turn(SENTENCES[:1]))
    first_turn = sink.of(TTSAudioRawFrame)[0].frame.context_id
    after = sink.events[interrupted_at[0] + 1 :]
    assert not [e for e in after if isinstance(e.frame, TTSAudioRawFrame) and e.frame.context_id == first_turn]
    assert [e for e in after if isinstance(e.frame, TTSAudioRawFrame)], "the next turn is spoken"
    assert not server.engine.has_work()


async def test_a_sentence_goes_on_to_the_context_as_its_audio_starts_not_when_it_is_sent(start_tts_server):
    """The text is sent long before it is spoken: a barge-in while the first sentence plays
    must leave the others, which the user never heard, out of the conversation."""
    server = await start_tts_server()
    tts = MagpieTTSService(url=server_url(server))

    async def speak_then_interrupt(sink):
        for frame in _turn(SENTENCES):
            await tts.queue_frame(frame)
        while not sink.of(TTSAudioRawFrame):
            await asyncio.sleep(0.01)
        await tts.queue_frame(InterruptionFrame())
        await asyncio.sleep(1.0)

    sink = await run_turns(tts, speak_then_interrupt)
    told = [e.frame.text for e in sink.of(TTSTextFrame)]
    assert told == [SENTENCES[0].strip()]


async def test_each_sentences_text_comes_just_before_its_audio(start_tts_server):
    server = await start_tts_server()
    sink = await run_turns(MagpieTTSService(url=server_url(server)), _turn(SENTENCES))
    kinds = [type(e.frame) for e in sink.events if isinstance(e.frame, (TTSTextFrame, TTSAudioRawFrame))]
    starts = [i for i, kind in enumerate(kinds) if kind is TTSTextFrame]
    assert [e.frame.text for e in sink.of(TTSTextFrame)] == [s.strip() for s in SENTENCES]
    assert all(kinds[i + 1] is TTSAudioRawFrame for i in starts) and starts[0] == 0
    assert starts[1] - starts[0] > 1 and starts[2] - starts[1] > 1, "each sentence's audio follows its text"


async def test_a_barge_in_before_the_first_audio_reports_no_ttfb(start_tts_server):
    """The time until the user interrupted is not a time to first audio."""
    server = await start_tts_server()
    slow_down(server, 0.1)
    tts = MagpieTTSService(url=server_url(server), settings=MagpieTTSService.Settings(mode="stream"))

    async def speak_then_interrupt_at_once(sink):
        for frame in _turn(["This sentence is interrupted before any of it is heard. "]):
            await tts.queue_frame(frame)
        await asyncio.sleep(0.15)
        assert not sink.of(TTSAudioRawFrame)
        await tts.queue_frame(InterruptionFrame())
        await asyncio.sleep(0.5)

    sink = await run_turns(tts, speak_then_interrupt_at_once, _turn(SENTENCES[:1]))
    reported = [d for e in sink.of(MetricsFrame) for d in e.frame.data if d.model == server.settings.model]
    ttfb = [d.value for d in reported if isinstance(d, TTFBMetricsData)]
    assert len(ttfb) == 1, f"only the turn that was heard has a TTFB: {ttfb}"


async def test_an_uninterruptible_sentence_barged_in_before_its_first_audio_keeps_its_ttfb(start_tts_server):
    """It is spoken whole, so its time to first audio is still measured, from its text."""
    server = await start_tts_server()
    slow_down(server, 0.1)
    tts = MagpieTTSService(url=server_url(server), settings=MagpieTTSService.Settings(mode="stream"))

    async def speak_then_interrupt_at_once(sink):
        greeting = TTSSpeakFrame("Welcome, this greeting is always heard whole. ")
        greeting.interruptible = False
        await tts.queue_frame(greeting)
        await asyncio.sleep(0.15)
        assert not sink.of(TTSAudioRawFrame)
        await tts.queue_frame(InterruptionFrame())
        while not sink.of(TTSStoppedFrame):
            await asyncio.sleep(0.02)

    sink = await run_turns(tts, speak_then_interrupt_at_once)
    reported = [d for e in sink.of(MetricsFrame) for d in e.frame.data if d.model == server.settings.model]
    ttfb = [d.value for d in reported if isinstance(d, TTFBMetricsData)]
    first_audio = sink.of(TTSAudioRawFrame)[0].t - sink.of(TTSStartedFrame)[0].t
    assert len(ttfb) == 1 and ttfb[0] == pytest.approx(first_audio, abs=0.05)


async def test_the_service_reconnects_when_the_server_restarts(start_tts_server):
    server = await start_tts_server()
    port = server.port
    tts = MagpieTTSService(url=server_url(server), reconnect_backoff_min_wait=0.2, reconnect_backoff_max_wait=0.5)

    async def restart(sink):
        await server.stop()
        await start_tts_server(port=port)
        while tts.ready is None:
            await asyncio.sleep(0.05)

    sink = await run_turns(tts, _turn(SENTENCES[:1]), restart, _turn(SENTENCES[1:2]))
    contexts = {e.frame.context_id for e in sink.of(TTSAudioRawFrame)}
    assert len(contexts) == 2, "both turns were spoken, before and after the restart"


async def test_turns_spoken_while_the_server_is_down_do_not_stop_the_service_reconnecting(start_tts_server):
    """Pipecat writes off a TTS service after three turns with no audio, and a written-off
    service stops reconnecting: turns lost to a server that is away must not count."""
    server = await start_tts_server()
    port = server.port
    tts = MagpieTTSService(
        url=server_url(server), stop_frame_timeout_s=0.3, reconnect_backoff_min_wait=0.2, reconnect_backoff_max_wait=0.5
    )

    async def speak_while_down(sink):
        await server.stop()
        while tts.ready is not None:
            await asyncio.sleep(0.02)
        for i in range(4):
            await play(tts.queue_frame, sink, _turn([f"Turn {i} with no server. "]))
        await asyncio.sleep(1.5)  # reconnect attempts fail after the silent turns
        await start_tts_server(port=port)
        async with asyncio.timeout(10):
            while tts.ready is None:
                await asyncio.sleep(0.05)

    sink = await run_turns(tts, _turn(SENTENCES[:1]), speak_while_down, _turn(SENTENCES[1:2]))
    assert tts.is_usable
    assert len({e.frame.context_id for e in sink.of(TTSAudioRawFrame)}) == 2, "spoken before and after"


async def test_a_batched_sentence_slower_than_pipecats_context_timeout_is_still_spoken(start_tts_server):
    """Pipecat ends an audio context that gets nothing for ``stop_frame_timeout_s``; a
    batched segment sends nothing until it is whole."""
    server = await start_tts_server()
    slow_down(server, 0.1)
    tts = MagpieTTSService(
        url=server_url(server), settings=MagpieTTSService.Settings(mode="batch"), stop_frame_timeout_s=0.4
    )
    head = FrameLog(Clock())
    sink = await run_turns(tts, _turn(SENTENCES[1:2]), head=head)
    assert len(sink.of(TTSStartedFrame)) == len(sink.of(TTSStoppedFrame)) == 1
    audio = sink.of(TTSAudioRawFrame)
    assert audio and audio[0].t - sink.of(TTSStartedFrame)[0].t > 0.4, "the audio came after the timeout"
    assert not head.of(ErrorFrame, FrameDirection.UPSTREAM)


async def test_a_turn_a_stalled_server_sends_nothing_for_ends_in_time(start_tts_server, monkeypatch):
    """The server answers pings but its engine is stuck: the turn, and the pipeline's end
    that waits for it, are not held for ever."""
    server = await start_tts_server()
    slow_down(server, 4.0)
    monkeypatch.setattr(MagpieTTSService, "owed_audio_timeout_s", 0.5)
    tts = MagpieTTSService(url=server_url(server), stop_frame_timeout_s=0.4)
    sink = await run_turns(tts, _turn(SENTENCES[:1]))
    assert len(sink.of(TTSStoppedFrame)) == 1 and not sink.of(TTSAudioRawFrame)
    assert sink.of(TTSStoppedFrame)[0].t - sink.of(TTSStartedFrame)[0].t < 2.0


async def test_a_turn_cut_off_by_the_servers_loss_ends_with_its_stop_frame(start_tts_server):
    server = await start_tts_server()
    slow_down(server, 0.05)
    tts = MagpieTTSService(
        url=server_url(server),
        settings=MagpieTTSService.Settings(mode="stream"),
        reconnect_backoff_min_wait=0.1,
        reconnect_backoff_max_wait=0.2,
    )
    sink = await run_turns(tts, _speak_then_lose_the_server(server, tts, [UNFINISHED] * 2, wait_s=5.0))
    cut = sink.of(TTSAudioRawFrame)[0].frame.context_id
    assert [e.frame.context_id for e in sink.of(TTSStoppedFrame)] == [cut]


async def test_a_service_that_gave_up_on_its_server_speaks_again_once_a_settings_change_brings_it_back(
    start_tts_server,
):
    """Pipecat takes any settings change as a possible fix for a written-off service: the
    service then connects anew, its receive loop having ended."""
    server = await start_tts_server()
    port = server.port
    tts = MagpieTTSService(url=server_url(server), reconnect_backoff_min_wait=0.1, reconnect_backoff_max_wait=0.1)
    tts.reconnect_attempts = 1

    async def outage_then_back(sink):
        await server.stop()
        async with asyncio.timeout(10):
            while tts.is_usable:
                await asyncio.sleep(0.05)
        await start_tts_server(port=port)
        await tts.queue_frame(TTSUpdateSettingsFrame(delta=MagpieTTSService.Settings(mode="batch")))
        async with asyncio.timeout(10):
            while tts.ready is None:
                await asyncio.sleep(0.05)

    sink = await run_turns(tts, _turn(SENTENCES[:1]), outage_then_back, _turn(SENTENCES[1:2]))
    assert len({e.frame.context_id for e in sink.of(TTSAudioRawFrame)}) == 2


async def test_a_turn_cut_off_by_a_server_the_service_gives_up_on_still_ends(start_tts_server):
    """Without reconnecting, the turn's context ends (Pipecat's timeout) rather than wait
    for ever for audio from a server that is gone; the pipeline then ends."""
    server = await start_tts_server()
    slow_down(server, 0.05)
    tts = MagpieTTSService(
        url=server_url(server), settings=MagpieTTSService.Settings(mode="stream"), reconnect_on_error=False
    )
    sink = await run_turns(tts, _speak_then_lose_the_server(server, tts, [UNFINISHED], wait_s=6.0))
    assert len(sink.of(TTSStoppedFrame)) == 1


async def test_text_outside_a_turn_is_spoken_and_its_context_ends(start_tts_server):
    """A bare TextFrame's sentences get contexts of their own, which Pipecat never completes
    (a sentence is spoken once the text after it shows that it ended)."""
    server = await start_tts_server()
    tts = MagpieTTSService(url=server_url(server))
    open_contexts = []

    async def count_open_contexts(sink):
        open_contexts.extend(len(s.contexts) for s in server.engine._sessions.values())

    sink = await run_turns(tts, [TextFrame("".join(SENTENCES[:2]))], count_open_contexts)
    assert sink.of(TTSAudioRawFrame) and len(sink.of(TTSStoppedFrame)) == 1
    assert open_contexts == [0]


async def test_a_barge_in_while_a_sentence_waits_to_be_sent_cancels_it_on_the_server(start_tts_server):
    """A send waits for the socket when the server reads slowly; a barge-in that lands
    then finds the sentence already on its way, and the server must still be told."""
    server = await start_tts_server()
    requests = record_speak(server)
    tts = MagpieTTSService(url=server_url(server))
    open_contexts = []

    async def interrupt_a_waiting_send(sink):
        tts._websocket.pause_writing()  # what a full send buffer does
        for frame in _turn([UNFINISHED]):
            await tts.queue_frame(frame)
        while not requests:
            await asyncio.sleep(0.01)
        await tts.queue_frame(InterruptionFrame())
        await asyncio.sleep(0.2)
        tts._websocket.resume_writing()
        await asyncio.sleep(1.0)
        open_contexts.extend(len(s.contexts) for s in server.engine._sessions.values())

    await run_turns(tts, interrupt_a_waiting_send)
    assert open_contexts == [0]


async def test_an_unknown_voice_is_an_invalid_request_that_retrying_cannot_fix(start_tts_server):
    server = await start_tts_server()
    tts = MagpieTTSService(
        url=server_url(server), settings=MagpieTTSService.Settings(voice="nobody"), stop_frame_timeout_s=0.3
    )
    head = FrameLog(Clock())
    await run_turns(tts, _turn(SENTENCES[:1]), head=head)
    first = head.of(ErrorFrame, FrameDirection.UPSTREAM)[0].frame
    assert first.category is ErrorCategory.INVALID_REQUEST and "unknown_voice" in first.error
    assert not tts.is_usable


async def test_a_voice_the_server_lacks_is_reported_on_connecting_with_the_voices_it_has(start_tts_server):
    server = await start_tts_server()
    tts = MagpieTTSService(url=server_url(server), settings=MagpieTTSService.Settings(voice="Aria"))
    head = FrameLog(Clock())
    await run_turns(tts, head=head)
    errors = [e.frame for e in head.of(ErrorFrame, FrameDirection.UPSTREAM)]
    assert len(errors) == 1 and errors[0].category is ErrorCategory.INVALID_REQUEST
    assert "'Aria'" in errors[0].error and str(server.engine.voices) in errors[0].error
    assert not tts.is_usable


class _HeldLoad(TtsServer):
    """A server that listens at once but loads its model only when ``release`` is set,
    like one restarting with a model that takes a while to load."""

    def __init__(self, settings: TtsServerSettings, release: threading.Event):
        super().__init__(settings)
        self._release = release

    def load_engine(self):
        self._release.wait(30)
        return super().load_engine()


async def test_turns_lost_while_the_server_loads_do_not_write_the_service_off(tiny_tts_path):
    """Pipecat writes a TTS service off after three turns with no audio; a server that is
    still loading its model has not spoken them."""
    release = threading.Event()
    server = _HeldLoad(TtsServerSettings(model=str(tiny_tts_path), port=0, device="cpu", temperature=0.0), release)
    await server.start()
    tts = MagpieTTSService(url=server_url(server), stop_frame_timeout_s=0.3)
    sink = FrameLog(Clock())
    usable_while_loading = []

    async def feed(worker):
        for i in range(3):
            await play(worker.queue_frame, sink, _turn([f"Turn {i} while the model loads. "]))
        usable_while_loading.append(tts.is_usable)
        release.set()
        while tts.ready is None:
            await asyncio.sleep(0.02)
        await play(worker.queue_frame, sink, _turn(SENTENCES[:1]))
        await worker.queue_frame(EndFrame())

    try:
        await run_worker([FrameLog(Clock()), tts, sink], feed, PipelineParams(audio_out_sample_rate=24000))
    finally:
        release.set()
        await server.stop()
    assert usable_while_loading == [True]
    assert tts.is_usable and sink.of(TTSAudioRawFrame), "the turn after the load was spoken"
