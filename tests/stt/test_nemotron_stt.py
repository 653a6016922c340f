"""NemotronSTTService in a real pipeline: real ASR server (tiny model), real Silero VAD and
Smart Turn v3, real speech paced in real time."""

from __future__ import annotations

import asyncio
import math
import socket

import numpy as np
import pytest
import soxr
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    STTUpdateSettingsFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import ProcessingMetricsData, STTUsageMetricsData, TTFBMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_response_universal import LLMUserAggregatorParams
from pipecat.processors.frame_processor import FrameDirection
from pipecat.transcriptions.language import Language
from pipecat.utils.errors import ErrorCategory

from pipecat_nvidia.protocol import PROTOCOL_VERSION, AsrReady
from pipecat_nvidia.stt import NemotronSTTService
from servers.asr.config import AsrServerSettings
from servers.asr.server import AsrServer
from tests.asr.client import server_url
from tests.loaded_server import slow_down
from tests.pipeline import Clock, FrameLog, run_worker
from tests.stt.harness import pcm_frames, run_pipeline, silence

pytestmark = pytest.mark.slow

TWO_SENTENCES = (0.0, 6.9)  # seconds of tests/data/harvard_16k.wav: silence, sentence, pause, sentence


def _speech(speech_int16, span, tail_s=1.5):
    begin, end = span
    return np.concatenate([speech_int16[int(begin * 16000) : int(end * 16000)], silence(tail_s)])


async def test_each_turn_closes_on_its_finalized_transcript_without_waiting_on_a_timer(start_asr_server, speech_int16):
    """The final transcript reaches the user aggregator before the turn closes, and the
    turn closes right after it: with a 2 s ``ttfs_p99_latency`` a timer would take 1.8 s."""
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server), ttfs_p99_latency=2.0)
    run = await run_pipeline(stt, _speech(speech_int16, TWO_SENTENCES))

    vad_stops, finals, user_stops = run.vad_stops(), run.near.of(TranscriptionFrame), run.user_stops()
    assert len(vad_stops) == len(finals) == len(user_stops) == 2
    for vad_stop, final, user_stop in zip(vad_stops, finals, user_stops):
        assert final.frame.finalized and final.frame.text
        assert vad_stop < final.t < user_stop
        assert user_stop - vad_stop < 0.8
    assert run.user_messages() == [f.frame.text for f in finals]


async def test_the_final_carries_the_words_streamed_before_the_stop(start_asr_server, speech_int16):
    """Every interim of an utterance is a prefix of its final: nothing shown is lost."""
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server))
    run = await run_pipeline(stt, _speech(speech_int16, TWO_SENTENCES))
    events = [e.frame for e in run.near.events if isinstance(e.frame, (InterimTranscriptionFrame, TranscriptionFrame))]
    assert any(isinstance(f, InterimTranscriptionFrame) for f in events), "interims stream while the user speaks"
    interims: list[str] = []
    finals = 0
    for frame in events:
        if isinstance(frame, InterimTranscriptionFrame):
            interims.append(frame.text)
            continue
        assert all(frame.text.startswith(text) for text in interims), (interims, frame.text)
        interims = []
        finals += 1
    assert finals == 2


async def test_interims_go_on_after_a_final_the_server_sent_while_the_user_speaks(start_asr_server, speech_int16):
    """A server that ends long utterances (``--max-utterance-s``) sends finals while the
    user still speaks: the words after one still show as interims."""
    server = await start_asr_server(max_utterance_s=1.0)
    stt = NemotronSTTService(url=server_url(server))
    run = await run_pipeline(stt, _speech(speech_int16, (1.0, 4.3)))
    vad_stop = run.vad_stops()[0]
    first_final = run.near.of(TranscriptionFrame)[0].t
    assert first_final < vad_stop, "the server ended an utterance mid-speech"
    assert [e for e in run.near.of(InterimTranscriptionFrame) if first_final < e.t < vad_stop]


async def test_a_rollover_final_after_the_vad_stop_is_not_taken_for_the_finalized_one(start_asr_server, speech_int16):
    """The race a long utterance makes: the server ends it at ``--max-utterance-s`` while
    the finalize is on its way. Speech sent faster than real time is still being
    transcribed when the finalize arrives, so rollover finals come after it; only the
    final that answers the finalize may close the turn."""
    server = await start_asr_server(max_utterance_s=1.0)
    stt = NemotronSTTService(url=server_url(server))
    log = FrameLog(Clock())

    async def feed(worker):
        while stt.ready is None:
            await asyncio.sleep(0.01)
        await worker.queue_frame(VADUserStartedSpeakingFrame())
        for chunk in pcm_frames(speech_int16[: int(6.9 * 16000)], 16000):
            await worker.queue_frame(InputAudioRawFrame(audio=chunk, sample_rate=16000, num_channels=1))
        await worker.queue_frame(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        while not any(e.frame.finalized for e in log.of(TranscriptionFrame)):
            await asyncio.sleep(0.05)
        await worker.queue_frame(EndFrame())

    await run_worker([stt, log], feed, PipelineParams(audio_in_sample_rate=16000), timeout=60)
    finals = log.of(TranscriptionFrame)
    [stop] = log.of(VADUserStoppedSpeakingFrame)
    late_rollovers = [e for e in finals if e.frame.result["rollover"] and e.t > stop.t]
    assert late_rollovers, "no rollover final came after the finalize: the race did not happen"
    assert [e.frame.finalized for e in finals] == [False] * (len(finals) - 1) + [True]
    assert not finals[-1].frame.result["rollover"]


async def test_a_final_that_comes_after_the_user_spoke_again_does_not_end_the_turn(start_asr_server, speech_int16):
    """A loaded server answers the first finalize after the VAD's second stop: only the
    second final, which answers the latest finalize, ends the turn."""
    server = await start_asr_server()
    slow_down(server, 0.2)
    stt = NemotronSTTService(url=server_url(server))
    log = FrameLog(Clock())

    async def feed(worker):
        while stt.ready is None:
            await asyncio.sleep(0.01)
        for span in ((1.0, 2.5), (5.0, 6.9)):
            # The VAD's frames overtake audio still queued: each waits for the audio before it.
            await worker.queue_frame(VADUserStartedSpeakingFrame())
            await asyncio.sleep(0.05)
            for chunk in pcm_frames(speech_int16[int(span[0] * 16000) : int(span[1] * 16000)], 16000):
                await worker.queue_frame(InputAudioRawFrame(audio=chunk, sample_rate=16000, num_channels=1))
            await asyncio.sleep(0.2)
            await worker.queue_frame(VADUserStoppedSpeakingFrame(stop_secs=0.2))
        while len(log.of(TranscriptionFrame)) < 2:
            await asyncio.sleep(0.05)
        await worker.queue_frame(EndFrame())

    await run_worker([stt, log], feed, PipelineParams(audio_in_sample_rate=16000), timeout=60)
    [_, second_stop] = log.of(VADUserStoppedSpeakingFrame)
    finals = log.of(TranscriptionFrame)
    assert finals[0].t > second_stop.t, "the first final came before the second stop: the race did not happen"
    assert [e.frame.finalized for e in finals] == [False, True]


async def test_finalize_tells_the_server_the_silence_the_vad_already_streamed(start_asr_server, speech_int16):
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server))
    run = await run_pipeline(stt, _speech(speech_int16, TWO_SENTENCES))
    assert [f.result["padding_ms"] for f in run.finals()] == [120.0, 120.0]


async def test_ttfb_and_finalize_time_are_reported(start_asr_server, speech_int16):
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server))
    run = await run_pipeline(stt, _speech(speech_int16, TWO_SENTENCES))
    ours = [m for m in run.metrics() if m.processor == stt.name]
    ttfb = [m.value for m in ours if isinstance(m, TTFBMetricsData)]
    finalize = [m.value for m in ours if isinstance(m, ProcessingMetricsData)]
    assert len(ttfb) == 2 and all(0.2 <= v < 0.6 for v in ttfb), ttfb  # the VAD's 200 ms + the finalize
    assert len(finalize) == 2 and all(0 < v < 0.4 for v in finalize), finalize


async def test_a_finalize_never_answered_reports_no_finalize_time(start_asr_server, speech_int16):
    """The server takes the resets but never answers them: an interruption (Pipecat stops
    every metric on one) would otherwise report the time since the finalize as one."""
    server = await start_asr_server()
    server.engine.reset = lambda *args, **kwargs: None
    stt = NemotronSTTService(url=server_url(server))

    async def interrupt():
        await stt.queue_frame(InterruptionFrame())

    run = await run_pipeline(stt, _speech(speech_int16, TWO_SENTENCES), between={300: interrupt})
    assert run.finals() == []
    assert not [m for m in run.metrics() if m.processor == stt.name and isinstance(m, ProcessingMetricsData)]


async def test_usage_is_the_audio_the_server_received_not_the_pauses_held_back(start_asr_server, speech_int16):
    """Reported with each final (and the rest at the end): the seconds the server got,
    which leave out the 4 s of silence held back after the last VAD stop."""
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server))
    audio = _speech(speech_int16, TWO_SENTENCES, tail_s=4.0)
    run = await run_pipeline(stt, audio)
    usage = [m.value.audio_seconds for m in run.metrics() if isinstance(m, STTUsageMetricsData)]
    received = float(server.metrics.audio_seconds._value.get())
    assert len(usage) >= 2 and sum(usage) == pytest.approx(received, abs=0.01)
    assert received < len(audio) / 16000 - 3.0


async def test_audio_reaches_the_server_once_per_step_not_once_per_frame(start_asr_server, speech_int16):
    """Each message costs the server CPU: the service sends 20 ms frames in one message per
    160 ms step (plus what each finalize flushes), and every sample still arrives (all of
    them: no pause between turns)."""
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server), pause_between_turns=False)
    audio = _speech(speech_int16, TWO_SENTENCES)
    run = await run_pipeline(stt, audio)
    messages = float(server.metrics.audio_messages._value.get())
    received = float(server.metrics.audio_seconds._value.get())
    assert received == pytest.approx(len(audio) / 16000, abs=0.16)
    assert messages <= math.ceil(len(audio) / 2560) + len(run.finals()) + 1, messages
    assert len(run.finals()) == 2 and all(f.text for f in run.finals())


async def test_between_turns_the_server_gets_no_audio_then_a_second_before_the_speech(start_asr_server, speech_int16):
    """Silence after a VAD stop stays with the client; the VAD's start brings the last
    second with it, so the utterance still begins before its speech (onsets at 1.3 s and
    4.42 s of the file, ends at 3.82 s and 6.52 s)."""
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server))
    gap_s = 4.0
    audio = np.concatenate(
        [
            silence(1.0),
            speech_int16[16000 : int(4.1 * 16000)],
            silence(gap_s),
            speech_int16[int(4.1 * 16000) : int(6.9 * 16000)],
            silence(gap_s),
        ]
    )
    run = await run_pipeline(stt, audio)
    finals = run.finals()
    assert len(finals) == 2 and all(f.text for f in finals)
    received = float(server.metrics.audio_seconds._value.get())
    assert received < len(audio) / 16000 - 2 * (gap_s - 1.5), "the silences after the VAD stops were sent"
    second_speech_s = 6.52 - 4.42
    assert finals[1].result["audio_ms"] / 1000 > second_speech_s + 0.2, "the second utterance lost its onset"


async def test_without_a_vad_every_frame_streams(start_asr_server, speech_int16):
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server))
    audio = _speech(speech_int16, TWO_SENTENCES)
    await run_pipeline(stt, audio, user_params=LLMUserAggregatorParams())
    received = float(server.metrics.audio_seconds._value.get())
    assert received == pytest.approx(len(audio) / 16000, abs=0.16)


async def test_telephone_rate_audio_is_resampled_to_16_khz(start_asr_server, speech):
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server), pause_between_turns=False)  # to count every sample
    speech_8k = soxr.resample(speech[: int(6.9 * 16000)], 16000, 8000)
    audio = np.concatenate([(speech_8k * 32767).astype(np.int16), silence(1.5, 8000)])
    run = await run_pipeline(stt, audio, sample_rate=8000)
    assert len(run.finals()) == 2 and all(f.text for f in run.finals())
    received = float(server.metrics.audio_seconds._value.get())
    # Unsent at the end: less than a step (160 ms) held for its boundary, and the
    # resampler's look-ahead (about 65 ms at 8 kHz).
    assert len(audio) / 8000 - 0.25 < received <= len(audio) / 8000


async def test_a_finalize_sends_all_the_audio_resampled_so_far(start_asr_server, speech):
    """At telephone rate the resampler holds back some look-ahead (tens of ms): left
    there, the server would have less trailing silence than the finalize tells it, and
    pad too little for the last word."""
    rate = 8000
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server), pause_between_turns=False)
    taken, at_finalize, at_reset = [0], [], []
    to_server_rate, finalize, reset = stt._at_server_rate, stt._finalize, server.engine.reset

    async def counting(audio):
        taken[0] += len(audio) // 2
        return await to_server_rate(audio)

    async def finalizing(vad_stop_secs):
        at_finalize.append(taken[0] * 16000 // rate)
        await finalize(vad_stop_secs)

    def resetting(sid, **kwargs):
        at_reset.append(server.engine._sessions[sid].audio.total_samples)
        return reset(sid, **kwargs)

    stt._at_server_rate, stt._finalize, server.engine.reset = counting, finalizing, resetting
    utterance = soxr.resample(speech[int(1.0 * 16000) : int(4.3 * 16000)], 16000, rate)
    audio = np.concatenate([(utterance * 32767).astype(np.int16), silence(1.5, rate)])
    await run_pipeline(stt, audio, sample_rate=rate)
    assert at_finalize and len(at_reset) == len(at_finalize)
    assert at_reset[0] == pytest.approx(at_finalize[0], abs=2)


async def test_audio_goes_at_the_rate_the_server_announces(start_asr_server, speech_int16):
    """A model of another rate (here a server that says 8 kHz) gets audio at its rate."""
    server = await start_asr_server()
    announce = server.ready_message
    server.ready_message = lambda engine, sid: announce(engine, sid).model_copy(update={"sample_rate": 8000})
    stt = NemotronSTTService(url=server_url(server), pause_between_turns=False)
    audio = _speech(speech_int16, (1.0, 4.3))
    await run_pipeline(stt, audio)
    received = float(server.metrics.audio_seconds._value.get())  # counted at the model's 16 kHz
    assert received == pytest.approx(len(audio) / 16000 / 2, abs=0.25)


async def test_the_service_reconnects_when_the_server_restarts(start_asr_server, speech_int16):
    """Mid-conversation the server goes away and comes back on the same port, after
    longer than Pipecat's three attempts take (a real restart imports for ~12 s): the
    pipeline does not hang and the next turn is transcribed."""
    server = await start_asr_server()
    port = server.port
    stt = NemotronSTTService(url=server_url(server), reconnect_backoff_min_wait=0.2, reconnect_backoff_max_wait=0.2)
    first = speech_int16[int(1.0 * 16000) : int(4.3 * 16000)]
    second = speech_int16[int(4.3 * 16000) : int(6.9 * 16000)]
    audio = np.concatenate([first, silence(1.0), second, silence(1.5)])

    async def restart():
        await server.stop()
        await asyncio.sleep(5 * 0.2)
        restarted = await start_asr_server(port=port)
        while stt.ready is None:
            await asyncio.sleep(0.05)
        assert restarted.port == port

    run = await run_pipeline(stt, audio, between={(len(first) + 16000) // 320: restart})
    finals = run.finals()
    assert len(finals) == 2 and all(f.text and f.finalized for f in finals)
    assert len(run.user_messages()) == 2


async def test_a_service_that_gave_up_on_its_server_transcribes_again_once_brought_back(start_asr_server, speech_int16):
    """Pipecat's way back for a written-off service is ``set_usable(True)``, once the
    server is up again: the service then connects anew, its receive loop having ended."""
    server = await start_asr_server()
    port = server.port
    stt = NemotronSTTService(url=server_url(server), reconnect_backoff_min_wait=0.1, reconnect_backoff_max_wait=0.1)
    stt.reconnect_attempts = 1
    first = speech_int16[int(1.0 * 16000) : int(4.3 * 16000)]
    second = speech_int16[int(4.3 * 16000) : int(6.9 * 16000)]
    audio = np.concatenate([first, silence(1.0), second, silence(1.5)])

    async def outage_then_back():
        await server.stop()
        async with asyncio.timeout(10):
            while stt.is_usable:
                await asyncio.sleep(0.05)
        await start_asr_server(port=port)
        await stt.set_usable(True)
        async with asyncio.timeout(10):
            while stt.ready is None:
                await asyncio.sleep(0.05)

    run = await run_pipeline(stt, audio, between={(len(first) + 16000) // 320: outage_then_back})
    finals = run.finals()
    assert len(finals) == 2 and all(f.text and f.finalized for f in finals)


async def test_a_message_the_server_refuses_costs_that_message_not_the_service(start_asr_server, speech_int16):
    """A server whose frame limit is below the second of pre-roll sent at a VAD start
    refuses that message, reports it and goes on; so does the service."""
    server = await start_asr_server(max_message_bytes=20000)
    stt = NemotronSTTService(url=server_url(server))
    audio = np.concatenate(
        [
            silence(1.0),
            speech_int16[16000 : int(4.1 * 16000)],
            silence(3.0),
            speech_int16[int(4.1 * 16000) : int(6.9 * 16000)],
            silence(1.5),
        ]
    )
    run = await run_pipeline(stt, audio)
    errors = [e.frame for e in run.head.of(ErrorFrame, FrameDirection.UPSTREAM)]
    assert errors and all("message_too_big" in e.error for e in errors)
    assert stt.is_usable
    assert len(run.finals()) == 2 and all(f.text for f in run.finals())


async def test_an_unreachable_server_gives_a_clear_error_not_a_loop(speech_int16):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stt = NemotronSTTService(
        url=f"ws://127.0.0.1:{port}", reconnect_backoff_min_wait=0.1, reconnect_backoff_max_wait=0.2
    )
    run = await run_pipeline(stt, _speech(speech_int16, (1.0, 4.3)), wait_ready=False)
    errors = [e.frame.error for e in run.head.of(ErrorFrame, FrameDirection.UPSTREAM)]
    # The first connect, each retry, and the giving up.
    assert len(errors) == 1 + NemotronSTTService.reconnect_attempts + 1, errors
    assert all(f"ws://127.0.0.1:{port}" in e for e in errors[:-1]), errors
    assert run.finals() == []
    assert not stt.is_usable, "after its retries the service gives up for good"


async def test_a_refused_token_is_an_authentication_error_and_is_not_retried(start_asr_server, speech_int16):
    server = await start_asr_server(auth_token="secret")
    stt = NemotronSTTService(
        url=server_url(server), auth_token="wrong", reconnect_backoff_min_wait=0.1, reconnect_backoff_max_wait=0.2
    )
    run = await run_pipeline(stt, _speech(speech_int16, (1.0, 2.0)), wait_ready=False)
    errors = [e.frame for e in run.head.of(ErrorFrame, FrameDirection.UPSTREAM)]
    assert [(e.category, "HTTP 401" in e.error) for e in errors] == [(ErrorCategory.AUTHENTICATION, True)], errors
    assert not stt.is_usable


class _FutureAsrServer(AsrServer):
    """A server of a later protocol version."""

    def ready_message(self, engine, session_id: str) -> AsrReady:
        return super().ready_message(engine, session_id).model_copy(update={"protocol_version": PROTOCOL_VERSION + 1})


async def test_a_server_of_another_protocol_version_is_refused_not_misread(tiny_asr_path, speech_int16):
    server = _FutureAsrServer(AsrServerSettings(model=str(tiny_asr_path), port=0, device="cpu"))
    await server.start()
    try:
        stt = NemotronSTTService(url=server_url(server))
        run = await run_pipeline(stt, _speech(speech_int16, (1.0, 2.0)), wait_ready=False)
    finally:
        await server.stop()
    errors = [e.frame.error for e in run.head.of(ErrorFrame, FrameDirection.UPSTREAM)]
    assert len(errors) == 1 and f"protocol version {PROTOCOL_VERSION + 1}" in errors[0]
    assert stt.ready is None and not stt.is_usable and run.finals() == []


async def test_a_refused_settings_change_does_not_revive_a_written_off_service(start_asr_server, speech_int16):
    """Pipecat takes any change as a possible fix; the language change is refused, so the
    service stays written off (it has stopped connecting)."""
    server = await start_asr_server(auth_token="secret")
    stt = NemotronSTTService(url=server_url(server), auth_token="wrong")
    await run_pipeline(stt, _speech(speech_int16, (1.0, 2.0)), wait_ready=False)
    assert not stt.is_usable
    await stt._update_settings(NemotronSTTService.Settings(language=Language.ES))
    assert not stt.is_usable


async def test_a_language_change_is_refused_since_the_server_transcribes_english(start_asr_server, speech_int16):
    server = await start_asr_server()
    stt = NemotronSTTService(url=server_url(server))

    async def ask_for_spanish():
        await stt.queue_frame(STTUpdateSettingsFrame(delta=NemotronSTTService.Settings(language=Language.ES)))

    run = await run_pipeline(stt, _speech(speech_int16, (1.0, 4.3)), between={0: ask_for_spanish})
    assert [f.language for f in run.finals()] == [Language.EN]
