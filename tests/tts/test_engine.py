"""The Magpie TTS engine with a tiny random model: streaming, batching, cancel, bad text."""

from __future__ import annotations

import logging
import threading
from logging.handlers import MemoryHandler

import numpy as np
import pytest
import torch

import servers.tts.advance
import servers.tts.codec
import servers.tts.sampling
from pipecat_nvidia.protocol import ErrorCode, TtsSpeak
from servers.common.cuda_graphs import FixedCall
from servers.common.nemo_logs import NEMO_LOGGER
from servers.tts.engine import MAX_OPEN_CONTEXTS, PRESETS, SegmentRejected
from servers.tts.text import TextPreparer, TextRejected
from tests.loaded_server import fail_once
from tests.tts.helpers import assert_same_audio, make_tts_engine, pcm, synthesize
from tests.weight_casts import weight_casts

TEXT = "Good morning to you."


@pytest.fixture(scope="module")
def engine(tiny_tts_path):
    return make_tts_engine(tiny_tts_path)


def test_stream_and_batch_give_the_same_audio(engine):
    """The codec decoder is causal: chunks decoded with its receptive field of context
    join into exactly the one-shot audio."""
    batch = pcm(synthesize(engine, TEXT, mode="batch"))
    for preset in ("balanced", "smooth"):
        streamed = pcm(synthesize(engine, TEXT, mode="stream", preset=preset))
        assert_same_audio(streamed, batch)


def test_the_fast_preset_is_close_to_batch_audio(engine):
    batch = pcm(synthesize(engine, TEXT, mode="batch")).astype(float)
    fast = pcm(synthesize(engine, TEXT, mode="stream", preset="fast")).astype(float)
    assert len(fast) == len(batch)
    assert np.abs(fast - batch).max() < 0.01 * np.abs(batch).max()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_streamed_audio_starts_after_the_presets_first_frames(engine, preset):
    messages = []
    sid = engine.open_session(messages.append)
    engine.speak(sid, TtsSpeak(context_id="c", text=TEXT, mode="stream", preset=preset))
    steps = 0
    while not messages:
        engine.step()
        steps += 1
    first = PRESETS[preset].first_frames
    assert steps == -(-first // engine.model.frame_stacking_factor)
    assert len(messages[0].pcm) == 2 * first * 1024
    engine.close_session(sid)
    engine.run_until_idle()


def test_batch_mode_sends_audio_only_when_the_segment_is_complete(engine):
    messages = []
    sid = engine.open_session(messages.append)
    engine.speak(sid, TtsSpeak(context_id="c", text=TEXT, mode="batch"))
    while not any(m.type == "segment_done" for m in messages):
        assert not messages, "nothing is sent before the step that completes the segment"
        engine.step()
    engine.close_session(sid)
    engine.run_until_idle()
    done = next(m for m in messages if m.type == "segment_done")
    audio = [m for m in messages if m.type == "audio"]
    assert done.first_audio_ms > 0 and done.stopped_by == "max_frames"
    assert len(pcm(messages)) == pytest.approx(done.audio_ms / 1000 * engine.sample_rate, abs=2)
    assert all(len(m.pcm) <= 2 * engine.sample_rate for m in audio)


def test_concurrent_sessions_share_steps_and_each_gets_only_its_own_audio(engine):
    requests = [
        dict(text="Good morning to you.", voice="0", mode="stream"),
        dict(text="The weather is fine.", voice="1", mode="batch"),
        dict(text="See you later, alligator.", voice="0", mode="stream", preset="smooth"),
    ]
    alone = [pcm(synthesize(engine, **r)) for r in requests]
    assert len({a.tobytes() for a in alone}) == 3, "different texts and voices give different audio"
    received = [[] for _ in requests]
    sids = [engine.open_session(r.append) for r in received]
    for sid, request in zip(sids, requests):
        engine.speak(sid, TtsSpeak(context_id="same-name-everywhere", **request))
        engine.flush(sid, "same-name-everywhere")
    stats = engine.run_until_idle()
    assert max(s.batch_size for s in stats) == 3
    for mine, expected in zip(received, alone):
        assert_same_audio(pcm(mine), expected)
        assert mine[-1].type == "done"


def test_one_sessions_many_turns_do_not_keep_anothers_waiting(tiny_tts_path):
    """With the batch full of one session's turns, another session's turn takes the first
    row that frees, ahead of the first session's next sentences."""
    engine = make_tts_engine(tiny_tts_path, max_batch=2)
    busy, other = [], []
    a, b = engine.open_session(busy.append), engine.open_session(other.append)
    for context_id in ("a1", "a2"):
        for _ in range(3):
            engine.speak(a, TtsSpeak(context_id=context_id, text=TEXT, mode="stream"))
    engine.step()
    engine.speak(b, TtsSpeak(context_id="b", text=TEXT, mode="stream"))
    while not any(m.type == "audio" for m in other):
        engine.step()
    assert sum(m.type == "segment_done" for m in busy) <= 2, "no more of its sentences started meanwhile"
    engine.close_session(a)
    engine.close_session(b)
    engine.run_until_idle()


def test_step_graphs_are_prepared_at_warm_up_and_give_the_eager_audio(tiny_tts_path, engine):
    """The CUDA-graph paths of the decoder step, the prefill, code sampling and codec decode
    (on a CPU recorded replays over their fixed buffers): three concurrent segments in a batch of four
    give what the eager engine gives."""
    graphed = make_tts_engine(tiny_tts_path, graph_max_batch=4)
    graphed.warm_up()
    assert graphed._decoder.sampler_graphs.captured == [1, 2, 4]
    assert graphed._decoder.advance_graphs.captured == [1, 2, 4]
    assert len(graphed._codec.captured) == 4 * 5  # rows 1-8, frames 4-64
    texts = ["Good morning to you.", "The weather is fine.", "See you later, alligator."]
    received = [[] for _ in texts]
    sids = [graphed.open_session(r.append) for r in received]
    for sid, text in zip(sids, texts):
        graphed.speak(sid, TtsSpeak(context_id="c", text=text, mode="batch"))
        graphed.flush(sid, "c")
    assert max(s.batch_size for s in graphed.run_until_idle()) == 3
    for mine, text in zip(received, texts):
        alone = pcm(synthesize(engine, text, mode="batch"))
        assert_same_audio(pcm(mine), alone)
    # The reserved cache held every segment: the graphs are all still in use.
    assert graphed.graph_batches == {"text_encoder": 4, "decoder_step": 4, "prefill": 4, "sampler": 4, "codec": 8}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "parts"),
    [
        (servers.tts.advance, {"text_encoder", "decoder_step", "prefill"}),
        (servers.tts.sampling, {"sampler"}),
        (servers.tts.codec, {"codec"}),
    ],
    ids=["advance", "sampler", "codec"],
)
def test_parts_whose_capture_fails_run_eagerly_and_the_audio_is_the_same(
    tiny_tts_path, engine, monkeypatch, module, parts
):
    """A capture that fails at warm-up (here: a read back from the device, which a GPU's
    capture refuses) leaves those parts eager, the others replaying, and the server serving."""

    def reading_back(fn, inputs, pool):
        return FixedCall(lambda *args: (args[0].sum().item(), fn(*args))[1], inputs, pool)

    monkeypatch.setattr(module, "FixedCall", reading_back)
    graphed = make_tts_engine(tiny_tts_path, graph_max_batch=2)
    graphed.warm_up()
    assert {part for part, batch in graphed.graph_batches.items() if batch == 0} == parts
    for mode in ("stream", "batch"):
        assert_same_audio(pcm(synthesize(graphed, TEXT, mode=mode)), pcm(synthesize(engine, TEXT, mode=mode)))


@pytest.mark.parametrize("graph_max_batch", [0, 4], ids=["eager", "fixed-shape"])
def test_a_bf16_engine_casts_no_weight_while_it_speaks(tiny_tts_path, graph_max_batch):
    """Autocast would cast every float32 weight on every decoder step, inside the CUDA graphs
    too; the engine stores them in bf16 instead, all but the codec's, which decodes in float32."""
    engine = make_tts_engine(tiny_tts_path, precision="bf16", graph_max_batch=graph_max_batch)
    engine.warm_up()
    codec = engine.model._codec_helper.codec_model
    assert {p.dtype for p in codec.parameters()} == {torch.float32}
    assert weight_casts(engine.model, lambda: synthesize(engine, TEXT, mode="stream")) == 0
    assert len(pcm(synthesize(engine, TEXT, mode="batch"))) > 0


def test_a_full_batch_turning_over_segments_keeps_its_graphs(tiny_tts_path):
    """At ``max_batch`` segments the reserved cache is exactly full: a segment that starts
    as another ends (after warm-up's own segments, too) must reuse its rows, or the cache
    grows and every later step runs without graphs."""
    graphed = make_tts_engine(tiny_tts_path, max_batch=2, graph_max_batch=2)
    graphed.warm_up()
    pool = graphed._decoder.transformer.pool
    rows, generation = pool.rows, pool.generation
    sids = [graphed.open_session(lambda m: None) for _ in range(3)]
    for sid in sids:
        for text in ("Good morning.", "The weather is fine today."):
            graphed.speak(sid, TtsSpeak(context_id="c", text=text, mode="batch"))
        graphed.flush(sid, "c")
    assert max(s.batch_size for s in graphed.run_until_idle()) == 2
    assert (pool.rows, pool.generation) == (rows, generation)
    assert graphed.graph_batches["decoder_step"] == 2


def test_segments_of_a_context_play_in_order_and_end_with_done(engine):
    messages = []
    sid = engine.open_session(messages.append)
    for text in ("First part.", "Second part.", "Third part."):
        engine.speak(sid, TtsSpeak(context_id="turn", text=text))
    engine.flush(sid, "turn")
    engine.run_until_idle()
    kinds = [(m.type, getattr(m, "segment_id", None)) for m in messages if m.type != "audio"]
    assert kinds == [("segment_done", "0"), ("segment_done", "1"), ("segment_done", "2"), ("done", None)]
    order = [m.segment_id for m in messages if m.type == "audio"]
    assert order == sorted(order)


def test_a_context_id_spoken_again_after_its_done_is_a_new_turn(engine):
    messages = []
    sid = engine.open_session(messages.append)
    for _ in range(2):
        engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT))
        engine.flush(sid, "turn")
        engine.run_until_idle()
    kinds = [(m.type, getattr(m, "segment_id", None)) for m in messages if m.type != "audio"]
    assert kinds == [("segment_done", "0"), ("done", None)] * 2
    engine.close_session(sid)


def test_cancel_stops_the_segment_within_a_step_and_drops_queued_ones(engine):
    messages = []
    sid = engine.open_session(messages.append)
    engine.speak(sid, TtsSpeak(context_id="turn", text="A rather long sentence that would take a while."))
    engine.speak(sid, TtsSpeak(context_id="turn", text="And another one queued behind it."))
    engine.speak(sid, TtsSpeak(context_id="other", text=TEXT))
    for _ in range(5):
        assert engine.step().batch_size == 2
    engine.cancel(sid, "turn")
    assert engine.step().batch_size == 1, "the cancelled context takes no further step"
    engine.run_until_idle()
    cancelled_at = next(i for i, m in enumerate(messages) if m.type == "cancelled")
    after = messages[cancelled_at + 1 :]
    assert not [m for m in after if getattr(m, "context_id", None) == "turn"]
    assert not [m for m in messages if m.type == "segment_done" and m.context_id == "turn"]
    assert [m.type for m in after if m.context_id == "other"][-1] == "segment_done"


def test_a_cancel_during_a_step_spares_the_codec_the_cancelled_turns_audio(engine, monkeypatch):
    """A barge-in arriving while the decoder step runs: the turn's audio that the step
    completed is never decoded (it would lengthen the step for every other session)."""
    messages = []
    sid = engine.open_session(messages.append)
    engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT, mode="batch"))
    engine.step()
    sequence = engine._busy[0].segments[0].sequence
    while sequence.frames + engine._decoder.frames_per_step < sequence.max_frames:
        engine.step()
    decoder_step, codec_decode, decoded = engine._decoder.step, engine._codec.decode, []

    def step_then_cancel(sequences):
        decoder_step(sequences)
        engine.cancel(sid, "turn")

    def decode(requests):
        decoded.extend(requests)
        return codec_decode(requests)

    monkeypatch.setattr(engine._decoder, "step", step_then_cancel)
    monkeypatch.setattr(engine._codec, "decode", decode)
    engine.step()
    assert sequence.done, "the step completed the segment"
    assert not decoded and [m.type for m in messages] == ["cancelled"]


def test_cancel_from_another_thread_while_steps_run_sends_nothing_after_cancelled(engine):
    messages = []
    lock = threading.Lock()

    def sink(message):
        with lock:
            messages.append(message)

    sid = engine.open_session(sink)
    engine.speak(sid, TtsSpeak(context_id="turn", text="A rather long sentence that would take a while."))
    stop = threading.Event()

    def keep_stepping():
        while not stop.is_set():
            if engine.wait_for_work(timeout=0.01):
                engine.step()

    stepper = threading.Thread(target=keep_stepping)
    stepper.start()
    try:
        while not any(m.type == "audio" for m in list(messages)):
            threading.Event().wait(0.005)
        engine.cancel(sid, "turn")
        threading.Event().wait(0.3)
    finally:
        stop.set()
        stepper.join()
    types = [m.type for m in messages]
    assert types.count("cancelled") == 1 and types[-1] == "cancelled"
    assert not engine.has_work()


def test_first_audio_is_timed_once_per_turn(engine):
    """What a listener waits for is the turn's first audio: a later segment's first audio
    (a batched sentence that comes whole) is not one."""
    sid = engine.open_session(lambda message: None)
    engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT, mode="stream"))
    engine.speak(sid, TtsSpeak(context_id="turn", text="And a second sentence.", mode="batch"))
    engine.speak(sid, TtsSpeak(context_id="next", text=TEXT, mode="stream"))
    latencies = []
    while engine.has_work():
        latencies += engine.step().first_audio_latencies
    engine.close_session(sid)
    assert len(latencies) == 2 and all(latency > 0 for latency in latencies)


def test_first_audio_is_timed_from_the_turns_first_text_even_when_that_was_refused(tiny_tts_path):
    now = [0.0]
    engine = make_tts_engine(tiny_tts_path, clock=lambda: now[0])
    sid = engine.open_session(lambda message: None)
    engine.speak(sid, TtsSpeak(context_id="turn", text="\U0001f642"))
    engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT, mode="stream"))
    now[0] = 10.0
    latencies = []
    while engine.has_work():
        latencies += engine.step().first_audio_latencies
    engine.close_session(sid)
    assert latencies == [10.0]


@pytest.mark.parametrize(("during_step", "last"), [("flush", "done"), ("cancel", "cancelled")])
def test_a_text_refused_in_a_step_is_told_before_a_flush_or_cancel_made_during_it(
    engine, monkeypatch, during_step, last
):
    """A text is refused (nothing to speak) before the step's decoder call, and its
    client's flush or cancel arrives during that call: the turn's ``done`` or
    ``cancelled`` is its last message, after the refusal."""
    messages = []
    other = engine.open_session(lambda message: None)
    sid = engine.open_session(messages.append)
    engine.speak(other, TtsSpeak(context_id="busy", text="Another turn keeps the decoder working."))
    engine.step()
    engine.speak(sid, TtsSpeak(context_id="turn", text="\U0001f642"))
    decoder_step = engine._decoder.step

    def step_then_client_message(sequences):
        decoder_step(sequences)
        getattr(engine, during_step)(sid, "turn")

    monkeypatch.setattr(engine._decoder, "step", step_then_client_message)
    engine.step()
    monkeypatch.undo()
    engine.close_session(other)
    engine.run_until_idle()
    assert [m.type for m in messages] == ["error", last]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("   ", ErrorCode.EMPTY_TEXT),
        ("\u2603\u2603", ErrorCode.EMPTY_TEXT),
        ("* " * 50, ErrorCode.EMPTY_TEXT),  # long enough for NeMo's sentence split, which drops it all
        ("word " * 500, ErrorCode.TEXT_TOO_LONG),
        ("word " * 101, ErrorCode.TEXT_TOO_LONG),  # one sentence of more tokens than decoder steps
    ],
)
def test_unspeakable_text_is_refused_and_the_context_goes_on(engine, text, code):
    messages = []
    sid = engine.open_session(messages.append)
    engine.speak(sid, TtsSpeak(context_id="turn", text=text))
    engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT))
    engine.flush(sid, "turn")
    engine.run_until_idle()
    error = next(m for m in messages if m.type == "error")
    assert (error.code, error.context_id, error.segment_id) == (code, "turn", "0")
    assert [m.type for m in messages if m.type != "audio"] == ["error", "segment_done", "done"]
    assert len(pcm(messages)) > 0


def test_short_sentences_too_many_tokens_together_are_split_into_their_sentences(engine):
    """NeMo splits text by its count of words: eight sentences of long words stay one piece
    of more tokens than the model speaks at once."""
    sentence = "Internationalization considerations notwithstanding, everything works."
    text = " ".join([sentence] * 8)
    preparer = TextPreparer(engine.model, max_chars=2000)
    assert len(preparer.prepare(text, "en")) == 8
    with pytest.raises(TextRejected, match="a sentence of"):
        preparer.prepare("word " * 101, "en")


def test_a_step_that_fails_ends_its_segments_with_an_error_and_the_engine_serves_on(engine):
    """A batch that cannot be computed (here the model's output layer no longer fits, as
    in a broken checkpoint) must not be retried forever with every turn stalled behind it."""
    messages = []
    sid = engine.open_session(messages.append)
    working = engine.model.final_proj
    engine.model.final_proj = torch.nn.Linear(working.in_features + 1, working.out_features)
    try:
        engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT))
        engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT))
        engine.flush(sid, "turn")
        engine.step()
    finally:
        engine.model.final_proj = working
    engine.run_until_idle()
    engine.close_session(sid)
    error = next(m for m in messages if m.type == "error")
    assert (error.code, error.context_id, error.segment_id) == (ErrorCode.INTERNAL, "turn", "0")
    assert [m.type for m in messages if m.type != "audio"] == ["error", "segment_done", "done"]
    assert_same_audio(pcm(messages), pcm(synthesize(engine, TEXT)))


def test_a_segment_that_fails_to_start_gives_its_cache_rows_back(tiny_tts_path, monkeypatch):
    """A start that fails after taking its rows (say, out of GPU memory on a shared card):
    the rows come back, or the next full batch grows the cache and every later step runs
    without graphs."""
    graphed = make_tts_engine(tiny_tts_path, max_batch=2, graph_max_batch=2)
    graphed.warm_up()
    pool = graphed._decoder.transformer.pool
    rows, generation = pool.rows, pool.generation
    # Growing the codes' store, after the rows were taken (the text encoding replays a graph).
    fail_once(monkeypatch, graphed._decoder._codes, "ensure", RuntimeError("out of memory"))
    messages = []
    sid = graphed.open_session(messages.append)
    graphed.speak(sid, TtsSpeak(context_id="failed", text=TEXT))
    graphed.step()
    assert [m.type for m in messages][:1] == ["error"]
    for turn in ("a", "b"):
        graphed.speak(sid, TtsSpeak(context_id=turn, text=TEXT, mode="batch"))
    assert max(s.batch_size for s in graphed.run_until_idle()) == 2
    assert (pool.rows, pool.generation) == (rows, generation)
    assert graphed.graph_batches["decoder_step"] == 2


def test_no_audio_of_a_segment_follows_its_error(engine):
    """A resampled segment that fails midway: its resampler's last samples are not sent
    after the error that ended it."""
    messages = []
    sid = engine.open_session(messages.append)
    engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT, mode="stream", sample_rate=16000))
    while not messages:
        engine.step()
    working = engine.model.final_proj
    engine.model.final_proj = torch.nn.Linear(working.in_features + 1, working.out_features)
    try:
        engine.step()
    finally:
        engine.model.final_proj = working
    engine.close_session(sid)
    engine.run_until_idle()
    assert messages[-1].type == "error" and all(m.type == "audio" for m in messages[:-1])


def test_a_model_whose_steps_fail_fails_warm_up_not_each_client(tiny_tts_path):
    broken = make_tts_engine(tiny_tts_path)
    working = broken.model.final_proj
    broken.model.final_proj = torch.nn.Linear(working.in_features + 1, working.out_features)
    with pytest.raises(RuntimeError, match="TTS warm-up failed: synthesis failed"):
        broken.warm_up()


def test_characters_the_tokenizer_lacks_are_skipped(engine):
    assert_same_audio(pcm(synthesize(engine, "h\u00e9llo \u2603 world")), pcm(synthesize(engine, "hello  world")))


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("voice", "nobody", ErrorCode.UNKNOWN_VOICE),
        ("language", "tlh", ErrorCode.UNKNOWN_LANGUAGE),
        ("preset", "warp", ErrorCode.UNKNOWN_PRESET),
    ],
)
def test_unknown_voice_language_or_preset_is_refused_at_once(engine, field, value, code):
    sid = engine.open_session(lambda m: None)
    with pytest.raises(SegmentRejected) as refused:
        engine.speak(sid, TtsSpeak(context_id="c", text=TEXT, **{field: value}))
    assert refused.value.code == code
    assert not engine.has_work()
    engine.close_session(sid)


def _refused_code(engine, sid: int, context_id: str, text: str = TEXT) -> ErrorCode | None:
    try:
        engine.speak(sid, TtsSpeak(context_id=context_id, text=text))
    except SegmentRejected as e:
        return e.code
    return None


def test_text_beyond_the_sessions_limit_is_refused_until_speaking_or_cancelling_frees_room(tiny_tts_path):
    engine = make_tts_engine(tiny_tts_path, max_queued_chars=2 * len(TEXT))
    sid = engine.open_session(lambda m: None)
    assert _refused_code(engine, sid, "a") is None
    assert _refused_code(engine, sid, "b") is None
    assert _refused_code(engine, sid, "c") == ErrorCode.TEXT_OVERFLOW
    engine.cancel(sid, "b")
    assert _refused_code(engine, sid, "c") is None
    engine.run_until_idle()
    assert _refused_code(engine, sid, "d") is None
    assert _refused_code(engine, sid, "e") is None
    engine.close_session(sid)


def test_empty_segments_count_against_the_sessions_limit(tiny_tts_path):
    engine = make_tts_engine(tiny_tts_path, max_queued_chars=3)
    sid = engine.open_session(lambda message: None)
    for _ in range(3):
        engine.speak(sid, TtsSpeak(context_id="turn", text=""))
    with pytest.raises(SegmentRejected) as refused:
        engine.speak(sid, TtsSpeak(context_id="turn", text=""))
    assert refused.value.code == ErrorCode.TEXT_OVERFLOW
    engine.close_session(sid)


def test_a_session_may_hold_only_so_many_open_contexts(engine):
    sid = engine.open_session(lambda m: None)
    for i in range(MAX_OPEN_CONTEXTS):
        assert _refused_code(engine, sid, str(i), "Hi.") is None
    assert _refused_code(engine, sid, "one too many", "Hi.") == ErrorCode.TEXT_OVERFLOW
    assert _refused_code(engine, sid, "0", "Hi.") is None, "an open context takes more text"
    engine.cancel(sid, "1")
    assert _refused_code(engine, sid, "one too many", "Hi.") is None
    engine.close_session(sid)
    engine.run_until_idle()


def test_long_text_is_spoken_sentence_by_sentence(engine):
    sentence = "This sentence has exactly eight words in it. "
    messages = synthesize(engine, sentence * 7, mode="batch")
    done = next(m for m in messages if m.type == "segment_done")
    single = next(m for m in synthesize(engine, sentence, mode="batch") if m.type == "segment_done")
    assert done.decoder_steps == pytest.approx(7 * single.decoder_steps, abs=7)


def test_audio_comes_at_the_rate_asked_for(engine):
    native = pcm(synthesize(engine, TEXT))
    resampled = synthesize(engine, TEXT, sample_rate=16000)
    assert all(m.sample_rate == 16000 for m in resampled if m.type == "audio")
    assert len(pcm(resampled)) == pytest.approx(len(native) * 16000 / 22050, abs=32)


def test_a_closed_session_stops_its_work(engine):
    messages = []
    sid = engine.open_session(messages.append)
    engine.speak(sid, TtsSpeak(context_id="c", text=TEXT))
    engine.step()
    engine.close_session(sid)
    count = len(messages)
    engine.run_until_idle()
    assert len(messages) == count and not engine.has_work()


def test_speech_ends_where_the_model_says_it_ends(tiny_tts_path):
    eager = make_tts_engine(tiny_tts_path)
    model = eager.model
    tokens = model.num_all_tokens_per_codebook
    with torch.no_grad():
        for k in range(model.num_audio_codebooks * model.frame_stacking_factor):
            model.final_proj.bias[k * tokens + model.audio_eos_id] = 1e4
            model.local_transformer_out_projections[k].bias[model.audio_eos_id] = 1e4
    messages = synthesize(eager, TEXT)
    done = next(m for m in messages if m.type == "segment_done")
    min_frames = model.inference_parameters.min_generated_frames
    assert done.stopped_by == "end_of_speech"
    assert len(pcm(messages)) == min_frames * 1024


class _SlowClock:
    """Time that passes a second per reading after the turn's first audio: a server too
    slow to keep a whole sentence ahead of the listener."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_turn_that_would_run_dry_gets_its_audio_early(tiny_tts_path):
    """A batch segment normally waits until it is complete, but not when the listener
    would hear a gap first: then what exists goes out at once (and still joins exactly)."""
    slow = make_tts_engine(tiny_tts_path, clock=_SlowClock())
    messages = []
    sid = slow.open_session(messages.append)
    slow.speak(sid, TtsSpeak(context_id="turn", text="Hi.", mode="stream", preset="smooth"))
    slow.speak(sid, TtsSpeak(context_id="turn", text=TEXT, mode="batch"))
    slow.flush(sid, "turn")
    slow.run_until_idle()
    second = [m for m in messages if m.type == "audio" and m.segment_id == "1"]
    assert len(second) > 3, "the batch segment was sent in pieces"
    reference = pcm(synthesize(make_tts_engine(tiny_tts_path), TEXT, mode="batch"))
    assert_same_audio(pcm(messages, segment_id="1"), reference)


def _step_until_audio(engine, messages: list) -> list:
    """Step until the engine sends audio; the stats of those steps."""
    before = sum(m.type == "audio" for m in messages)
    stats = []
    while sum(m.type == "audio" for m in messages) == before:
        stats.append(engine.step())
    return stats


def test_a_listener_that_ran_dry_waiting_for_text_has_the_new_audio_ahead_of_it(tiny_tts_path):
    """A listener that played a turn's first sentence and then heard silence (the LLM was
    slow with the next) plays the next audio from when it comes: the scheduler must see
    that audio ahead of it, not the silence as a debt for the rest of the turn."""
    now = [0.0]
    engine = make_tts_engine(tiny_tts_path, clock=lambda: now[0])
    messages = []
    sid = engine.open_session(messages.append)
    engine.speak(sid, TtsSpeak(context_id="turn", text="Hi.", mode="stream"))
    engine.run_until_idle()
    now[0] = 60.0
    engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT, mode="stream"))
    stats = _step_until_audio(engine, messages)
    heard = len(pcm(messages, segment_id="1")) / engine.sample_rate
    assert engine.queue_state().min_ahead_s == pytest.approx(heard)
    assert [(s.text_gaps, s.synthesis_gaps) for s in stats if s.text_gaps or s.synthesis_gaps] == [(1, 0)]


def test_a_listener_that_ran_dry_with_the_text_here_is_a_late_synthesis(tiny_tts_path):
    now = [0.0]
    engine = make_tts_engine(tiny_tts_path, clock=lambda: now[0])
    messages = []
    sid = engine.open_session(messages.append)
    engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT, mode="stream", preset="fast"))
    engine.speak(sid, TtsSpeak(context_id="turn", text="And a second sentence.", mode="stream"))
    first = _step_until_audio(engine, messages)
    now[0] = 60.0
    later = _step_until_audio(engine, messages)
    assert sum(s.synthesis_gaps for s in first + later) == 1 and not any(s.text_gaps for s in first + later)


def test_the_text_left_to_speak_shrinks_as_its_audio_is_sent(tiny_tts_path):
    """The scheduler feeds the TTS more text when it runs short: the part of a sentence
    already sent as audio is not text waiting to be spoken."""
    engine = make_tts_engine(tiny_tts_path)
    messages = []
    sid = engine.open_session(messages.append)
    text = "This is a rather long sentence that the bot speaks in several pieces of audio."
    engine.speak(sid, TtsSpeak(context_id="turn", text=text, mode="stream", preset="fast"))
    before = engine.queue_state().text_ahead_s
    _step_until_audio(engine, messages)
    _step_until_audio(engine, messages)
    sent = len(pcm(messages)) / engine.sample_rate
    assert engine.queue_state().text_ahead_s == pytest.approx(max(0.0, before - sent))
    engine.close_session(sid)


def test_a_turn_that_has_spoken_all_its_text_is_short_of_text_beside_another_with_plenty(tiny_tts_path):
    """On a host serving several conversations, one turn's long queued text must not hide
    another turn waiting for its LLM's next sentence: the scheduler would keep giving the
    GPU to the TTS while that listener hears silence."""
    engine = make_tts_engine(tiny_tts_path)
    talkative, waiting = [], []
    long_turn = engine.open_session(talkative.append)
    engine.speak(long_turn, TtsSpeak(context_id="long", text=" ".join([TEXT] * 20), mode="batch"))
    short_turn = engine.open_session(waiting.append)
    engine.speak(short_turn, TtsSpeak(context_id="short", text="Hi.", mode="stream", preset="fast"))
    while not any(m.type == "segment_done" for m in waiting):
        engine.step()
    assert engine.queue_state().text_ahead_s == 0.0
    engine.close_session(long_turn)
    engine.close_session(short_turn)


def test_a_flushed_turn_asks_for_no_more_text(tiny_tts_path):
    engine = make_tts_engine(tiny_tts_path)
    sid = engine.open_session(lambda message: None)
    engine.speak(sid, TtsSpeak(context_id="turn", text="Hi.", mode="stream"))
    engine.flush(sid, "turn")
    assert engine.queue_state().text_ahead_s is None
    engine.close_session(sid)


@pytest.mark.parametrize("mode", ["stream", "batch"])
def test_the_engine_foresees_which_steps_decode_audio_or_start_a_segment(tiny_tts_path, mode):
    """A scheduler plans around how long the next step takes, and one that also decodes
    audio or starts a segment takes several times one that does neither. Barring an early
    end of speech, the engine knows which steps will."""
    engine = make_tts_engine(tiny_tts_path, clock=lambda: 0.0)
    sid = engine.open_session(lambda message: None)
    engine.speak(sid, TtsSpeak(context_id="turn", text=TEXT, mode=mode))
    engine.speak(sid, TtsSpeak(context_id="turn", text="And more.", mode=mode))
    engine.flush(sid, "turn")
    foreseen, happened = [], []
    while engine.has_work():
        state = engine.queue_state()
        foreseen.append((state.next_step_decodes, state.next_step_starts))
        stats = engine.step()
        happened.append((stats.audio_seconds > 0, stats.started > 0))
    assert foreseen == happened
    assert sum(decoded for decoded, _ in happened) >= (3 if mode == "stream" else 2)
    assert sum(started for _, started in happened) == 2


def test_the_engine_foresees_the_audio_of_a_long_segments_later_sentences(tiny_tts_path):
    """Each sentence of a long segment (over 45 words, NeMo's split) is spoken as a
    sequence of its own, whose first audio comes as soon as the first one's did."""
    engine = make_tts_engine(tiny_tts_path, clock=lambda: 0.0)
    sid = engine.open_session(lambda message: None)
    sentence = "This sentence has exactly eight words in it. "
    engine.speak(sid, TtsSpeak(context_id="turn", text=sentence * 6, mode="stream", preset="fast"))
    foreseen, happened, started = [], [], 0
    while engine.has_work():
        foreseen.append(engine.queue_state().next_step_decodes)
        stats = engine.step()
        happened.append(stats.audio_seconds > 0)
        started += stats.started
    assert started == 6, "the text was not split into sentences"
    assert foreseen == happened


def test_nemos_log_keeps_no_record_of_what_was_spoken(engine):
    """NeMo warns of each character its tokenizer lacks, with the whole text; its
    target-less log buffers would keep every such warning for the life of the server."""
    nemo_logger = logging.getLogger(NEMO_LOGGER)
    emitted = []
    counter = logging.Handler(logging.WARNING)
    counter.emit = emitted.append
    level = nemo_logger.level
    nemo_logger.setLevel(logging.WARNING)
    nemo_logger.addHandler(counter)
    try:
        for _ in range(3):
            synthesize(engine, f"{TEXT} \u2603")
    finally:
        nemo_logger.removeHandler(counter)
        nemo_logger.setLevel(level)
    assert emitted, "the tokenizer warned of the character it lacks"
    buffers = [h for h in nemo_logger.handlers if isinstance(h, MemoryHandler)]
    assert buffers and not any(h.buffer for h in buffers)
