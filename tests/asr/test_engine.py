"""The streaming engine's sessions: finalisation, padding, resets, limits, cost."""

import time

import numpy as np
import pytest
import torch

from pipecat_nvidia.protocol import AsrTranscript, ErrorCode
from pipecat_nvidia.step_audio import StepAlignedAudio
from servers.asr.engine import MAX_WAITING_RESETS, AudioOverflow
from servers.common.engine import EngineFull
from tests.asr.helpers import (
    make_engine,
    offline_text,
    stepping_in_background,
    stream,
    transcribe,
    use_nemo_cuda_graphs_decoder,
)
from tests.loaded_server import fail_once


def test_final_transcript_equals_offline_transcription_of_padded_audio(tiny_asr_path, speech_int16):
    engine = make_engine(tiny_asr_path)
    utterance = speech_int16[16000 : 16000 * 6]
    messages = transcribe(engine, utterance, trailing_silence_ms=200)
    final = messages[-1]
    assert final.is_final and final.padding_ms == 120.0
    assert final.text == offline_text(engine, utterance, padding_ms=120)
    assert final.text, "the tiny model emits text for speech"
    assert final.audio_ms == pytest.approx(5000.0)


@pytest.mark.parametrize(
    ("right_context", "trailing_ms", "padding_ms"),
    [(1, 200, 120), (1, 0, 320), (1, 500, 0), (0, 200, 0), (0, 100, 60), (6, 200, 920), (13, 200, 2040)],
)
def test_finalize_pads_only_what_the_encoder_still_needs(
    tiny_asr_path, speech_int16, right_context, trailing_ms, padding_ms
):
    """(R + 1) x 160 ms of trailing audio, minus what the client already streamed."""
    engine = make_engine(tiny_asr_path, right_context=right_context)
    assert engine.geometry.finalize_audio_ms == (right_context + 1) * 160
    utterance = speech_int16[16000 : 16000 * 4]
    final = transcribe(engine, utterance, trailing_silence_ms=trailing_ms)[-1]
    assert final.padding_ms == padding_ms
    assert final.text == offline_text(engine, utterance, padding_ms=padding_ms)


def test_finalize_emits_the_tokens_streaming_withheld(tiny_asr_path, speech_int16):
    engine = make_engine(tiny_asr_path)
    messages = transcribe(engine, speech_int16[: 16000 * 4], trailing_silence_ms=200)
    interims = [m.text for m in messages if not m.is_final]
    final = messages[-1].text
    assert interims, "streaming produced interim text"
    assert all(final.startswith(text) for text in interims)
    assert len(final) > len(interims[-1])


def test_interims_arrive_as_the_text_changes(tiny_asr_path, speech_int16):
    engine = make_engine(tiny_asr_path)
    messages = transcribe(engine, speech_int16[: 16000 * 8])
    interims = [m for m in messages if not m.is_final]
    assert len(interims) >= 3
    assert all(a.text != b.text for a, b in zip(interims, interims[1:]))
    assert all(a.audio_ms < b.audio_ms for a, b in zip(interims, interims[1:]))


def test_soft_reset_returns_the_current_text_and_starts_afresh(tiny_asr_path, speech_int16):
    engine = make_engine(tiny_asr_path)
    messages = []
    sid = engine.open_session(messages.append)
    first = speech_int16[: 16000 * 4 + 1000]
    stream(engine, sid, first)
    last_interim = messages[-1]
    engine.reset(sid, finalize=False)
    engine.run_until_idle()
    soft = messages[-1]
    assert soft.is_final and soft.padding_ms == 0 and soft.text == last_interim.text
    # It covers the audio transcribed: the part of a chunk not yet taken is dropped.
    assert last_interim.audio_ms <= soft.audio_ms < 1000 * len(first) / 16000
    assert soft.utterance_id == 0

    second = speech_int16[16000 * 6 : 16000 * 10]
    stream(engine, sid, second)
    engine.reset(sid, finalize=True, trailing_silence_ms=200)
    engine.run_until_idle()
    assert messages[-1].utterance_id == 1
    assert messages[-1].text == transcribe(engine, second)[-1].text


def test_audio_sent_after_a_reset_belongs_to_the_next_utterance(tiny_asr_path, speech_int16):
    engine = make_engine(tiny_asr_path)
    first, second = speech_int16[16000 : 16000 * 4], speech_int16[16000 * 6 : 16000 * 9]
    messages = []
    sid = engine.open_session(messages.append)
    engine.push_audio(sid, first.tobytes())
    engine.reset(sid, finalize=True, trailing_silence_ms=200)
    engine.push_audio(sid, second.tobytes())
    engine.reset(sid, finalize=True, trailing_silence_ms=200)
    engine.run_until_idle()
    finals = [m for m in messages if m.is_final]
    assert [m.utterance_id for m in finals] == [0, 1]
    assert finals[0].text == offline_text(engine, first, 120)
    assert finals[1].text == offline_text(engine, second, 120)


def test_a_never_ending_utterance_is_finalised_in_segments_without_losing_or_splitting_words(
    tiny_asr_path, speech_int16
):
    utterance = speech_int16[: 16000 * 9]
    whole = transcribe(make_engine(tiny_asr_path), utterance)[-1].text
    segmented = transcribe(make_engine(tiny_asr_path, max_utterance_s=2.0), utterance)
    finals = [m for m in segmented if m.is_final]
    assert len(finals) >= 4
    assert [m.utterance_id for m in finals] == list(range(len(finals)))
    # Joined as Pipecat joins them: a word the segments split would read as two.
    assert " ".join(m.text for m in finals if m.text) == whole


def test_a_long_utterance_sent_at_once_is_segmented_by_the_audio_transcribed(tiny_asr_path, speech_int16):
    """Audio a client sends ahead is not yet transcribed: segments are cut after
    ``max_utterance_s`` of audio the encoder took (at the next word's end, within twice
    that), and say how much that was."""
    messages = transcribe(make_engine(tiny_asr_path, max_utterance_s=1.0), speech_int16[: 16000 * 5], piece=16000 * 5)
    segment_ends = [m for m in messages if m.is_final][:-1]
    assert len(segment_ends) >= 2
    assert all(1000.0 <= m.audio_ms < 2200.0 for m in segment_ends), [m.audio_ms for m in segment_ends]
    assert all(m.rollover for m in segment_ends) and not messages[-1].rollover
    assert all(m.audio_ms >= 0 for m in messages)


def test_a_buffer_limit_too_small_for_one_step_is_refused_and_the_least_one_transcribes(tiny_asr_path, speech_int16):
    geometry = make_engine(tiny_asr_path).geometry
    least = geometry.least_buffer_samples
    with pytest.raises(ValueError, match="cannot hold one step's audio"):
        make_engine(tiny_asr_path, max_buffered_s=(least - 1) / 16000)
    frame = 320
    engine = make_engine(tiny_asr_path, max_buffered_s=(least + frame) / 16000)
    utterance = speech_int16[16000 : 16000 * 3]
    messages = transcribe(engine, utterance, piece=frame)
    assert messages[-1].is_final
    assert messages[-1].text == offline_text(engine, utterance, 120)


def test_audio_beyond_the_buffer_limit_is_refused_and_the_session_goes_on(tiny_asr_path, speech_int16):
    engine = make_engine(tiny_asr_path, max_buffered_s=1.0)
    messages = []
    sid = engine.open_session(messages.append)
    with pytest.raises(AudioOverflow):
        engine.push_audio(sid, speech_int16[: 16000 * 2].tobytes())
    stream(engine, sid, speech_int16[16000 : 16000 * 3])
    engine.reset(sid, finalize=True, trailing_silence_ms=200)
    engine.run_until_idle()
    assert messages[-1].is_final
    assert messages[-1].text == offline_text(engine, speech_int16[16000 : 16000 * 3], 120)


def test_resets_beyond_those_waiting_to_be_answered_are_refused_and_the_session_goes_on(tiny_asr_path, speech_int16):
    """Each reset takes a step of its own: a client sending them faster than steps run
    would queue work (and finals) without end."""
    engine = make_engine(tiny_asr_path)
    messages = []
    sid = engine.open_session(messages.append)
    for _ in range(1 + MAX_WAITING_RESETS):  # the one being answered, and those waiting
        engine.reset(sid)
    with pytest.raises(AudioOverflow, match="resets"):
        engine.reset(sid)
    engine.run_until_idle()
    assert sum(isinstance(m, AsrTranscript) and m.is_final for m in messages) == 1 + MAX_WAITING_RESETS
    utterance = speech_int16[16000 : 16000 * 3]
    stream(engine, sid, utterance)
    engine.reset(sid, finalize=True, trailing_silence_ms=200)
    engine.run_until_idle()
    assert messages[-1].is_final and messages[-1].text == offline_text(engine, utterance, 120)


def test_audio_waiting_behind_a_reset_counts_toward_the_buffer_limit_until_it_is_taken(tiny_asr_path, speech_int16):
    engine = make_engine(tiny_asr_path, max_buffered_s=1.0)
    sid = engine.open_session(lambda message: None)
    engine.reset(sid)
    engine.push_audio(sid, speech_int16[16000 : 16000 + 9600].tobytes())
    with pytest.raises(AudioOverflow):
        engine.push_audio(sid, speech_int16[16000 : 16000 + 9600].tobytes())
    engine.run_until_idle()
    engine.push_audio(sid, speech_int16[16000 : 16000 + 9600].tobytes())


def test_a_step_that_fails_ends_its_utterances_with_an_error_and_the_sessions_go_on(tiny_asr_path, speech_int16):
    """A batch that cannot be computed (here the model's preprocessor no longer takes its
    input, as in a broken checkpoint): every session in it gets an error and a fresh
    utterance, and transcribes as before once the model works."""
    engine = make_engine(tiny_asr_path)
    utterance = speech_int16[16000 : 16000 * 3]
    messages = []
    sid = engine.open_session(messages.append)
    model = engine._step.model
    working = model.preprocessor
    model.preprocessor = torch.nn.Identity()
    try:
        stream(engine, sid, utterance)
    finally:
        model.preprocessor = working
    errors = [m for m in messages if m.type == "error"]
    assert errors and all(e.code == ErrorCode.INTERNAL for e in errors)
    _assert_transcribes_as_before(engine, sid, messages, utterance)


def _assert_transcribes_as_before(engine, sid: int, messages: list, utterance) -> None:
    """After a failure, the session's next utterance ends with NeMo's offline text."""
    messages.clear()
    stream(engine, sid, utterance)
    engine.reset(sid, finalize=True, trailing_silence_ms=200)
    engine.run_until_idle()
    assert messages[-1].is_final and messages[-1].text == offline_text(engine, utterance, padding_ms=120)


def test_a_failed_step_keeps_the_text_already_streamed_as_the_resets_final(tiny_asr_path, speech_int16):
    engine = make_engine(tiny_asr_path)
    messages = []
    sid = engine.open_session(messages.append)
    stream(engine, sid, speech_int16[16000 : 16000 * 3])
    shown = [m.text for m in messages if m.type == "transcript"][-1]
    model = engine._step.model
    working = model.preprocessor
    model.preprocessor = torch.nn.Identity()
    try:
        engine.reset(sid, finalize=True, trailing_silence_ms=0)
        engine.run_until_idle()
    finally:
        model.preprocessor = working
    error, final = messages[-2:]
    assert error.code == ErrorCode.INTERNAL
    assert final.is_final and not final.rollover and final.text == shown != ""


def test_a_failed_state_reset_fails_only_its_step(tiny_asr_path, speech_int16, monkeypatch):
    """Fresh state for a new session's slot is written before the step that needs it; a
    write that fails (say, a transient GPU error) is that step's failure: its sessions get
    an error, and streams on to their finals like any other."""
    engine = make_engine(tiny_asr_path)
    utterance = speech_int16[16000 : 16000 * 3]
    messages = []
    sid = engine.open_session(messages.append)
    fail_once(monkeypatch, engine._pool, "reset", RuntimeError("out of memory"))
    engine.push_audio(sid, utterance[: engine.geometry.first_step_samples].tobytes())
    engine.step()
    assert [m.code for m in messages if m.type == "error"] == [ErrorCode.INTERNAL]
    _assert_transcribes_as_before(engine, sid, messages, utterance)


def test_a_failed_step_reports_no_chunk_latency(tiny_asr_path, speech_int16):
    """Nothing was transcribed: a latency would count towards the ASR's deadline misses."""
    engine = make_engine(tiny_asr_path)
    sid = engine.open_session(lambda message: None)
    engine.push_audio(sid, speech_int16[: engine.geometry.first_step_samples].tobytes())
    engine._step.model.preprocessor = torch.nn.Identity()
    stats = engine.step()
    assert stats.batch_size == 1 and stats.chunk_latencies == ()


def test_a_chunk_stepped_after_a_reset_is_timed_from_its_own_audio(tiny_asr_path, speech_int16):
    """Audio sent ahead waits for its step as long as it waits, reset or not."""
    engine = make_engine(tiny_asr_path)
    sid = engine.open_session(lambda message: None)
    engine.push_audio(sid, speech_int16[: 16000 * 4].tobytes())
    time.sleep(0.5)
    engine.reset(sid, finalize=True, trailing_silence_ms=200)
    stats = engine.step()
    assert stats.final_rows == 0 and stats.chunk_latencies[0] >= 0.5


def test_a_model_whose_steps_fail_fails_warm_up_not_each_client(tiny_asr_path):
    engine = make_engine(tiny_asr_path)
    engine._step.model.preprocessor = torch.nn.Identity()  # as a broken checkpoint would
    with pytest.raises(RuntimeError, match="ASR warm-up failed: transcription failed"):
        engine.warm_up()


def test_opening_a_session_runs_no_tensor_work(tiny_asr_path, speech_int16):
    """The event loop opens sessions; on a GPU a write to the state would wait for the step
    running there. A reused slot is put back to the initial state on the stepping thread."""
    engine = make_engine(tiny_asr_path, initial_slots=1)
    earlier = engine.open_session(lambda message: None)
    stream(engine, earlier, speech_int16[16000 * 4 : 16000 * 5])  # leaves its state in the slot
    engine.close_session(earlier)
    messages = []
    with torch.profiler.profile() as profile:
        sid = engine.open_session(messages.append)
    assert len(profile.events()) == 0
    stream(engine, sid, speech_int16[16000 : 16000 * 3])
    engine.reset(sid, finalize=True, trailing_silence_ms=200)
    engine.run_until_idle()
    assert messages[-1].text == offline_text(engine, speech_int16[16000 : 16000 * 3], padding_ms=120)


def test_sessions_beyond_the_limit_are_refused(tiny_asr_path):
    engine = make_engine(tiny_asr_path, max_sessions=2)
    a = engine.open_session(lambda m: None)
    engine.open_session(lambda m: None)
    with pytest.raises(EngineFull):
        engine.open_session(lambda m: None)
    engine.close_session(a)
    engine.open_session(lambda m: None)


def test_sessions_closed_at_any_moment_free_their_state(tiny_asr_path, speech_int16):
    """Sessions opened, fed and closed from another thread while steps run leak nothing."""
    engine = make_engine(tiny_asr_path, initial_slots=2)
    rng = np.random.default_rng(1)
    with stepping_in_background(engine):
        open_sessions = []
        for _ in range(60):
            open_sessions.append(engine.open_session(lambda m: None))
            for sid in open_sessions:
                engine.push_audio(sid, speech_int16[: int(rng.integers(1000, 6000))].tobytes())
            if rng.random() < 0.3:
                engine.reset(open_sessions[0], finalize=True)
            if len(open_sessions) > 5 or rng.random() < 0.4:
                engine.close_session(open_sessions.pop(int(rng.integers(len(open_sessions)))))
            time.sleep(float(rng.random()) * 0.01)
        for sid in open_sessions:
            engine.close_session(sid)
    assert engine.session_count == 0
    assert engine._pool.in_use == 0


def test_clients_that_come_and_go_while_nobody_streams_leave_one_reset_per_slot(tiny_asr_path, speech_int16):
    """Health probes or a reconnecting client against an idle server: no step runs to
    reset their slots, and what waits for that step must not grow with each of them."""
    engine = make_engine(tiny_asr_path, initial_slots=2)
    for _ in range(100):
        engine.close_session(engine.open_session(lambda m: None))
    assert len(engine._ended_slots) <= engine._pool.capacity
    assert [m.text for m in transcribe(engine, speech_int16[16000 : 16000 * 3])][-1]


@pytest.mark.slow
def test_per_chunk_work_stays_flat_over_ten_minutes_of_continuous_audio(tiny_asr_path, speech_int16):
    """Features are computed per chunk, never over the whole utterance: the preprocessor
    reads as much audio per step in the tenth minute as in the first (the time this
    takes is `bench/asr_long_stream.py`'s to measure), and what a session holds is bounded
    (the text, by segments of 20 s here)."""
    engine = make_engine(tiny_asr_path, max_utterance_s=20.0)
    read = []
    engine._step.model.preprocessor.register_forward_pre_hook(
        lambda module, args, kwargs: read.append(kwargs["input_signal"].shape[1]), with_kwargs=True
    )
    chunk = 2560
    ten_minutes = np.tile(speech_int16, int(np.ceil(600 * 16000 / len(speech_int16))))[: 600 * 16000]
    messages = []
    sid = engine.open_session(messages.append)
    for i in range(0, len(ten_minutes), chunk):
        engine.push_audio(sid, ten_minutes[i : i + chunk].tobytes())
        engine.run_until_idle()
    session = engine._sessions[sid]
    assert len(read) > 3700, "a step per 160 ms chunk"
    assert max(read[-375:]) == max(read[10:375]) < 2 * chunk
    assert session.audio.buffered_samples <= 2 * chunk + 512
    assert len(session.text) < 5000, "the rolling segments bound the text held"
    assert sum(m.is_final for m in messages) >= 29


def test_sessions_opened_while_steps_run_do_not_disturb_their_state(tiny_asr_path, speech_int16):
    """Opening sessions grows the state pool while a step is using it (2 slots at first,
    so it grows four times): every session must still get exactly its transcript."""
    engine = make_engine(tiny_asr_path, initial_slots=2)
    utterance = speech_int16[16000 : 16000 * 3]
    expected = offline_text(make_engine(tiny_asr_path), utterance, padding_ms=120)
    with stepping_in_background(engine):
        sessions = []
        for _ in range(24):
            messages = []
            sid = engine.open_session(messages.append)
            sessions.append((sid, messages))
            engine.push_audio(sid, utterance[:1600].tobytes())
        for offset in range(1600, len(utterance), 1600):
            for sid, _ in sessions:
                engine.push_audio(sid, utterance[offset : offset + 1600].tobytes())
        for sid, _ in sessions:
            engine.reset(sid, finalize=True, trailing_silence_ms=200)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(m and m[-1].is_final for _, m in sessions):
            time.sleep(0.05)
        finals = [messages[-1].text for _, messages in sessions]
    assert finals == [expected] * len(finals)


def test_audio_arriving_during_a_first_chunk_waits_for_a_whole_steady_chunk(tiny_asr_path, speech_int16):
    """Audio pushed while an utterance's first (short) chunk is being transcribed must not
    make the session ready by the first chunk's size: the next chunk is a steady one."""
    engine = make_engine(tiny_asr_path)
    g = engine.geometry
    utterance = speech_int16[16000 : 16000 * 4]
    sid = engine.open_session(lambda message: None)
    first_end = g.samples_for_frames(g.first_chunk_frames)
    during_end = g.samples_for_frames(g.first_chunk_frames + g.chunk_frames - 1)
    engine.push_audio(sid, utterance[:first_end].tobytes())
    run = engine._step.run

    def run_while_more_audio_arrives(rows):
        engine.push_audio(sid, utterance[first_end:during_end].tobytes())
        return run(rows)

    engine._step.run = run_while_more_audio_arrives
    engine.step()
    engine._step.run = run
    assert not engine.has_work(), "one frame short of a steady chunk"
    engine.push_audio(sid, utterance[during_end : during_end + g.hop].tobytes())
    assert engine.has_work()


def test_warm_up_prepares_every_step_bucket_before_serving(tiny_asr_path, speech_int16):
    """Graphs are captured at warm-up, not when a larger batch first arrives (a stall for
    every stream, and a hazard for other GPU threads): steady and final steps of up to the
    limit find theirs ready, and none runs eagerly."""
    engine = make_engine(tiny_asr_path, graph_max_batch=5)
    engine.warm_up()
    graphs = engine.encoder_graphs
    prepared = graphs.captured
    widths = sorted({width for _, width in prepared})
    assert len(widths) == 2, "a steady chunk's width and the longest final's"
    assert prepared == [(rows, width) for rows in (1, 2, 4, 8) for width in widths]
    assert engine.graph_batches == {"encoder_step": 5}
    sessions = [engine.open_session(lambda message: None) for _ in range(5)]
    for sid in sessions:
        engine.push_audio(sid, speech_int16[16000 : 16000 * 2].tobytes())
    engine.run_until_idle()
    for sid in sessions:
        engine.reset(sid, finalize=True, trailing_silence_ms=0)
    engine.run_until_idle()
    assert graphs.captured == prepared
    assert graphs.eager_steps == 0


def _read_back_in_the_conformer_call(engine) -> None:
    """As when a NeMo update adds a read back from the GPU to the conformer: no capture of
    the encoder step can hold it."""
    graphs = engine.encoder_graphs
    step = graphs._step
    graphs._step = lambda x, lengths, slots: (x.sum().item(), step(x, lengths, slots))[1]


def test_an_encoder_step_that_cannot_be_captured_runs_eagerly_from_warm_up_on(tiny_asr_path, speech_int16):
    """The server then serves eagerly (slower, logged) rather than not at all."""
    utterance = speech_int16[16000 : 16000 * 3]
    expected = [m.text for m in transcribe(make_engine(tiny_asr_path), utterance)]
    engine = make_engine(tiny_asr_path, graph_max_batch=4)
    _read_back_in_the_conformer_call(engine)
    engine.warm_up()
    assert engine.encoder_graphs.captured == []
    assert engine.graph_batches == {"encoder_step": 0}
    assert [m.text for m in transcribe(engine, utterance)] == expected
    assert engine.encoder_graphs.eager_steps > 0


def test_buckets_that_cannot_be_captured_after_the_first_leave_every_step_eager(tiny_asr_path, speech_int16):
    """Captured on first use, then not at warm-up's capture of every bucket."""
    utterance = speech_int16[16000 : 16000 * 3]
    engine = make_engine(tiny_asr_path, graph_max_batch=4)
    expected = [m.text for m in transcribe(engine, utterance)]
    assert engine.encoder_graphs.captured, "the first steps captured their buckets"
    _read_back_in_the_conformer_call(engine)
    engine.encoder_graphs.prepare_all()
    assert engine.encoder_graphs.captured == []
    assert engine.graph_batches == {"encoder_step": 0}
    assert [m.text for m in transcribe(engine, utterance)] == expected


def test_session_state_carries_no_autograd_history(tiny_asr_path, speech_int16):
    """Serving never needs gradients: state that required them would chain an autograd
    record onto every session opened or reset, for as long as the server runs."""
    engine = make_engine(tiny_asr_path, graph_max_batch=4, max_sessions=8)
    engine.warm_up()
    transcribe(engine, speech_int16[16000 : 16000 * 2])
    engine.open_session(lambda message: None)
    assert not [name for name, value in engine._step.pool._tensors.items() if value.requires_grad]


def test_nemos_graph_decoder_sees_the_largest_step_at_warm_up_not_while_serving(tiny_asr_path, speech_int16):
    """It captures its graphs again for any batch larger than it has seen (on a GPU, a
    stall for every stream): warm-up shows it the most rows a step can hold."""
    engine = make_engine(tiny_asr_path, max_sessions=6)
    use_nemo_cuda_graphs_decoder(engine._step)
    engine.warm_up()
    computer = engine._step.model.decoding.decoding.decoding_computer
    prepared = computer.state
    assert prepared.batch_size == 6
    sessions = [engine.open_session(lambda message: None) for _ in range(6)]
    for sid in sessions:
        engine.push_audio(sid, speech_int16[16000 : 16000 * 2].tobytes())
        engine.reset(sid, finalize=True, trailing_silence_ms=0)
    assert max(s.batch_size for s in engine.run_until_idle()) == 6
    assert computer.state is prepared


def test_a_final_takes_one_step_while_other_sessions_stream(tiny_asr_path, speech_int16):
    """All the finalize padding at once is longer than a chunk; it still finishes in the
    next step beside a session that keeps streaming (the final transcript is on the
    user's critical path)."""
    engine = make_engine(tiny_asr_path)
    streaming, finishing = [], []
    a, b = engine.open_session(streaming.append), engine.open_session(finishing.append)
    for sid in (a, b):
        engine.push_audio(sid, speech_int16[16000 : 16000 * 3].tobytes())
    engine.run_until_idle()
    engine.push_audio(a, speech_int16[16000 * 3 : 16000 * 4].tobytes())
    engine.reset(b, finalize=True, trailing_silence_ms=0)
    stats = engine.step()
    assert stats.final_rows == 1 and stats.batch_size == 2
    assert finishing[-1].is_final and finishing[-1].padding_ms == 320.0


def test_the_engine_says_when_a_streaming_sessions_next_chunk_will_be_complete(tiny_asr_path, speech_int16):
    """A scheduler plans around the ASR's clock: with audio arriving in real time in 20 ms
    frames, the next chunk is complete when the frame holding its last sample arrives."""
    engine = make_engine(tiny_asr_path)
    assert engine.due_in_s() is None, "no session"
    sid = engine.open_session(lambda message: None)
    assert engine.due_in_s() is None, "no audio yet"
    frame, g = 320, engine.geometry
    needed = g.samples_for_frames(g.first_chunk_frames)
    pushed = (needed // frame - 3) * frame
    for start in range(0, pushed, frame):
        engine.push_audio(sid, speech_int16[start : start + frame].tobytes())
    frames_left = -(-(needed - pushed) // frame)
    assert engine.due_in_s() == pytest.approx(frames_left * frame / g.sample_rate, abs=0.005)
    engine.push_audio(sid, speech_int16[pushed : pushed + frames_left * frame].tobytes())
    assert engine.due_in_s() == 0.0, "a step can run now"
    engine.run_until_idle()
    time.sleep(0.25)
    assert engine.due_in_s() is None, "the client stopped streaming"


def test_an_empty_frame_does_not_hide_a_streaming_session(tiny_asr_path, speech_int16):
    engine = make_engine(tiny_asr_path)
    sid = engine.open_session(lambda message: None)
    for start in range(0, 320 * 2, 320):
        engine.push_audio(sid, speech_int16[start : start + 320].tobytes())
    engine.push_audio(sid, b"")
    assert engine.due_in_s() > 0


def test_a_client_sending_large_frames_still_counts_as_streaming(tiny_asr_path, speech_int16):
    """Clients that send 100 ms at a time leave longer gaps than a 20 ms client's: the
    engine still expects their next chunk, whole frames after their last."""
    engine = make_engine(tiny_asr_path)
    sid = engine.open_session(lambda message: None)
    frame, g = engine.geometry.ms_to_samples(100), engine.geometry
    pushed = time.monotonic()
    engine.push_audio(sid, speech_int16[:frame].tobytes())
    engine.run_until_idle()  # the first chunk
    time.sleep(max(0.0, 0.15 - (time.monotonic() - pushed)))  # longer than a 20 ms client's gap
    frames_left = -(-(g.samples_for_frames(g.first_chunk_frames + g.chunk_frames) - frame) // frame)
    due, elapsed = engine.due_in_s(), time.monotonic() - pushed
    assert due is not None and due == pytest.approx(frames_left * 0.1 - elapsed, abs=0.01)


def test_a_burst_of_audio_does_not_stretch_the_pace_the_engine_expects(tiny_asr_path, speech_int16):
    """NemotronSTTService sends a step's audio at a time, but a second at once (its
    pre-roll) as a turn starts: the next chunk still comes a step later, not a second."""
    engine = make_engine(tiny_asr_path)
    sid = engine.open_session(lambda message: None)
    step, burst = engine.geometry.step_samples, engine.geometry.sample_rate
    engine.push_audio(sid, speech_int16[:step].tobytes())
    pushed = time.monotonic()
    engine.push_audio(sid, speech_int16[step : step + burst].tobytes())
    engine.run_until_idle()
    due, elapsed = engine.due_in_s(), time.monotonic() - pushed
    assert due is not None and due <= max(0.0, step / engine.geometry.sample_rate - elapsed) + 0.005


@pytest.mark.parametrize("right_context", [0, 1, 6])
def test_audio_held_to_the_announced_step_boundaries_is_never_late(tiny_asr_path, speech_int16, right_context):
    """A client holding 20 ms frames back until ``first_step_samples`` / ``step_samples``
    (what ``ready`` announces) costs no latency: the audio it held could not make a step,
    and each frame it sends with that audio makes one possible at once. Also across a reset."""
    engine = make_engine(tiny_asr_path, right_context=right_context)
    g = engine.geometry
    held = StepAlignedAudio(g.first_step_samples, g.step_samples)
    sid = engine.open_session(lambda message: None)
    frame = 320
    sends = 0
    for utterance in (speech_int16[: 16000 * 3], speech_int16[16000 * 3 : 16000 * 5]):
        for start in range(0, len(utterance), frame):
            pcm = utterance[start : start + frame].tobytes()
            out = held.add(pcm)
            if not out:
                continue
            engine.push_audio(sid, out[: -len(pcm)])
            assert not engine.has_work(), "the held audio alone could make a step: it was sent late"
            engine.push_audio(sid, pcm)
            assert engine.has_work(), "the audio sent makes no step: it was sent early"
            engine.run_until_idle()
            sends += 1
        engine.push_audio(sid, held.end_utterance())
        engine.reset(sid, finalize=True, trailing_silence_ms=0.0)
        engine.run_until_idle()
    assert sends >= 5000 * 16 // g.step_samples
