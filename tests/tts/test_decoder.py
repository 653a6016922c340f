"""Our step-at-a-time driver reproduces NeMo's own generate_speech loop."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from servers.common.precision import autocast, store_weights_for_autocast
from servers.tts.decoder import MagpieDecoder, Sequence
from servers.tts.model import SamplingSettings, load_magpie
from servers.tts.sampling import CodeSampler, GraphedSampler, sample_codes
from tests.host_reads import HOST_READS, operations


@pytest.fixture(scope="module")
def model(tiny_tts_path):
    return load_magpie(str(tiny_tts_path), device="cpu", sampling=SamplingSettings(temperature=0.0))


def _tokens(model, text):
    return torch.tensor(model.tokenizer.encode(text, "english_phoneme") + [model.eos_id])


def _generate_speech(model, text, frames, voice):
    """NeMo's whole-utterance loop with its decoder cache on (as NeMo's inference runs a
    single-chunk batch), stopped after ``frames`` codec frames: the codes it says are speech."""
    model.inference_parameters.max_decoder_steps = frames
    tokens = _tokens(model, text)
    batch = {"text": tokens[None], "text_lens": torch.tensor([len(tokens)]), "speaker_indices": voice}
    model.decoder.reset_cache(use_cache=True)
    with torch.no_grad():
        out = model.generate_speech(
            batch,
            chunk_state=model.create_chunk_state(1),
            end_of_text=[True],
            beginning_of_text=True,
            use_cfg=True,
            use_local_transformer_for_inference=True,
        )
    model.inference_parameters.max_decoder_steps = 500
    model.decoder.reset_cache(use_cache=False)
    return out.predicted_codes[0, :, : int(out.predicted_codes_lens[0])]


OVERLAPPING = [("Hello there, how are you?", 0, 0), ("Short one.", 1, 3), ("Another sentence, longer.", 0, 5)]
"""Three sequences as ``(text, voice, the step it joins at)``."""


def _decode_overlapping(
    model, graph_max_batch: int, frames: int, autocast_dtype: torch.dtype | None = None
) -> tuple[MagpieDecoder, list[Sequence]]:
    """The ``OVERLAPPING`` sequences decoded to ``frames`` codec frames each, steps under
    autocast to ``autocast_dtype`` as the engine runs them."""
    decoder = MagpieDecoder(model, autocast_dtype=autocast_dtype, graph_max_batch=graph_max_batch)
    if graph_max_batch:
        decoder.reserve(sequences=3, max_frames=40, max_text_tokens=64)
        decoder.prepare_graphs()
    sequences = [Sequence(tokens=_tokens(model, t), voice=v, max_frames=frames) for t, v, _ in OVERLAPPING]
    for step in range(OVERLAPPING[-1][2] + frames):
        running = [s for s, (_, _, start) in zip(sequences, OVERLAPPING) if start <= step and not s.done]
        if running:
            with autocast("cpu", autocast_dtype):
                decoder.step(running)
    assert all(s.done for s in sequences)
    return decoder, sequences


@pytest.mark.parametrize("graph_max_batch", [0, 4], ids=["eager", "fixed-shape"])
def test_sequences_joining_and_leaving_a_batch_equal_generate_speech_alone(model, graph_max_batch):
    """Fixed-shape: the steps CUDA graphs replay (over the whole reserved cache, rows padded
    to a power of two), replayed from a recording on this CPU."""
    decoder, sequences = _decode_overlapping(model, graph_max_batch, frames=24)
    for sequence, (text, voice, _) in zip(sequences, OVERLAPPING):
        assert sequence.speech_frames == 24
        ours = sequence.codes[:, -sequence.frames :]
        assert torch.equal(ours, _generate_speech(model, text, 24, voice))
    if graph_max_batch:  # the fixed-shape steps stayed in use (the cache never outgrew them)
        assert (
            decoder.text_graphs.captured
            == decoder.advance_graphs.captured
            == decoder.prefill_graphs.captured
            == [1, 2, 4]
        )
        assert decoder.graph_batches == {"text_encoder": 4, "decoder_step": 4, "prefill": 4, "sampler": 4}


def _bf16_codes(model, graph_max_batch: int) -> list[torch.Tensor]:
    _, sequences = _decode_overlapping(model, graph_max_batch, frames=16, autocast_dtype=torch.bfloat16)
    return [s.codes[:, -s.frames :] for s in sequences]


@pytest.mark.parametrize("graph_max_batch", [0, 4], ids=["eager", "fixed-shape"])
def test_weights_stored_in_bf16_change_no_code(tiny_tts_path, graph_max_batch):
    """Text encoder, decoder steps and code sampling under bf16 autocast give bit for bit
    the same codes with the layers' weights stored in bf16 as with float32 weights."""
    models = [load_magpie(str(tiny_tts_path), device="cpu", sampling=SamplingSettings(temperature=0.0)) for _ in "ab"]
    stored = models[1]
    assert store_weights_for_autocast(stored, torch.bfloat16, skip=(stored._codec_helper.codec_model,)) > 0
    cast, kept = (_bf16_codes(m, graph_max_batch) for m in models)
    for ours, expected in zip(kept, cast):
        assert torch.equal(ours, expected)
    assert not torch.equal(cast[0], cast[1]), "the codes depend on text and voice"


@pytest.mark.parametrize("part", ["text_graphs", "advance_graphs", "prefill_graphs", "sampler_graphs"])
def test_the_graphed_parts_read_nothing_back_from_the_device(model, part):
    """Checked here, on the fixed-shape calls themselves, before any GPU captures them."""
    decoder = MagpieDecoder(model, graph_max_batch=2)
    decoder.reserve(sequences=2, max_frames=16, max_text_tokens=64)
    decoder.prepare_graphs()
    called = operations(getattr(decoder, part)._buckets.get(2))
    assert "aten::linear" in called and not called & HOST_READS


def test_a_checkpoint_whose_alignment_layers_attend_to_no_text_steps_without_a_prior(model, monkeypatch):
    """The attention prior is built from the alignment: with none, the fixed-shape steps
    (captured for a prior that never comes) run as the eager ones do."""
    layers = len(model.decoder.layers)
    monkeypatch.setattr(model.inference_parameters, "estimate_alignment_from_layers", [layers])
    codes = []
    for graph_max_batch in (0, 2):
        decoder = MagpieDecoder(model, graph_max_batch=graph_max_batch)
        if graph_max_batch:
            decoder.reserve(sequences=2, max_frames=16, max_text_tokens=64)
            decoder.prepare_graphs()
        sequence = Sequence(tokens=_tokens(model, "Hello there."), voice=0, max_frames=16)
        while not sequence.done:
            decoder.step([sequence])
        codes.append(sequence.codes)
    assert torch.equal(*codes)


@pytest.mark.parametrize("text", ["Hi.", "Hello there, how are you?"])
def test_end_of_speech_follows_text_progress_at_the_step_nemo_does(model, monkeypatch, text):
    """With finished-sentence tracking on, end of speech is forced a set number of steps
    after the text is read, judged (as in NeMo) from the step's own attention."""
    monkeypatch.setattr(model.inference_parameters, "ignore_finished_sentence_tracking", False)
    sequence = Sequence(tokens=_tokens(model, text), voice=0, max_frames=120)
    decoder = MagpieDecoder(model)
    while not sequence.done:
        decoder.step([sequence])
    assert sequence.speech_frames < 120, "tracking never ended the speech"
    ours = sequence.codes[:, sequence._bos_frames : sequence._bos_frames + sequence.speech_frames]
    assert torch.equal(ours, _generate_speech(model, text, 120, 0))


def test_a_decoder_step_does_the_same_work_late_in_a_segment_as_early(model):
    """Each step computes only its new position (the prefix is cached): counted in
    floating-point operations, not timed."""
    decoder = MagpieDecoder(model)
    sequence = Sequence(tokens=_tokens(model, "A sentence to speak for a while."), voice=0, max_frames=200)
    flops = []
    for _ in range(60):
        with FlopCounterMode(display=False) as counter:
            decoder.step([sequence])
        flops.append(counter.get_total_flops())
    assert not sequence.done
    # Positions 22 and 80 (a 20-position voice context, the BOS, then one per step).
    assert flops[59] < 1.1 * flops[1]


NO_KERNEL = frozenset(
    f"aten::{name}"
    for name in (
        "alias as_strided as_strided_ detach empty empty_strided expand lift_fresh narrow permute "
        "reshape select slice squeeze t transpose unbind unsqueeze view"
    ).split()
)
"""Operations that only make views or allocate: on a GPU they launch no kernel (and how
many of them run can depend on shapes)."""


def _launching_operations(events) -> Counter:
    """The public operations a step called, views and allocations left out; the backend's
    own (``aten::_*`` and the convolution backends: which one runs on this CPU depends on
    the batch size) are counted through their public callers."""
    return Counter(
        e.name
        for e in events
        if e.name.startswith("aten::")
        and not e.name.startswith(("aten::_", "aten::mkldnn_", "aten::thnn_", "aten::slow_conv"))
        and e.name not in NO_KERNEL
    )


def test_a_decoder_step_runs_the_same_operations_for_twelve_sequences_as_for_four(model):
    """Nothing in a step is done once per sequence (on a GPU each such operation would be
    a kernel launch per sequence): the new codes of all go into one tensor in one write,
    the newest stacks come out in one read, the bookkeeping runs on the host. Counted with
    the torch profiler."""

    def operations(batch: int) -> Counter:
        decoder = MagpieDecoder(model)
        text = "The quick brown fox jumps over the lazy dog."
        sequences = [Sequence(tokens=_tokens(model, text), voice=0, max_frames=400) for _ in range(batch)]
        for _ in range(3):
            decoder.step(sequences)
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            decoder.step(sequences)
        return _launching_operations(profiled.events())

    assert operations(12) == operations(4)


def test_a_sequence_keeps_its_codes_after_it_leaves_and_its_slot_is_reused(model):
    decoder = MagpieDecoder(model)
    first = Sequence(tokens=_tokens(model, "One."), voice=0, max_frames=8)
    for _ in range(3):
        decoder.step([first])
    kept = first.codes.clone()
    second = Sequence(tokens=_tokens(model, "Two, three."), voice=1, max_frames=8)
    for _ in range(3):
        decoder.step([second])
    assert second.rows == first.rows, "the slot was reused"
    assert torch.equal(first.codes, kept) and first.frames == 3 * decoder.frames_per_step


def test_sequences_that_leave_give_their_cache_rows_to_the_next(model):
    decoder = MagpieDecoder(model)
    for _ in range(3):
        pair = [Sequence(tokens=_tokens(model, text), voice=0, max_frames=8) for text in ("One.", "Two.")]
        for _ in range(3):
            decoder.step(pair)
        decoder.step([])
        assert decoder.transformer.pool.rows_in_use == 0
    assert decoder.transformer.pool.rows == 2 * 2 + 1  # two sequences, two rows each (CFG), a scratch row


def test_a_sequence_joining_as_another_leaves_takes_its_rows_and_keeps_the_graphs(model):
    """The decoder graphs hold the reserved cache's addresses: a cache that grew because a
    new sequence was given rows before a finished one gave its back would drop them."""
    decoder = MagpieDecoder(model, graph_max_batch=2)
    decoder.reserve(sequences=2, max_frames=16, max_text_tokens=64)
    decoder.prepare_graphs()
    reserved = decoder.transformer.pool.rows
    first, second, third = (
        Sequence(tokens=_tokens(model, t), voice=0, max_frames=8) for t in ("One.", "Two.", "Three.")
    )
    for _ in range(2):
        decoder.step([first, second])
    decoder.step([second, third])
    assert decoder.transformer.pool.rows == reserved
    assert decoder.advance_graphs.covers(2)


def test_graphs_over_a_grown_cache_read_as_off_at_once_and_are_dropped_by_the_next_step(model):
    """``/health`` reads the graph state from the event loop: the read must not drop the
    graphs under a step that is replaying them; the stepping thread drops them."""
    decoder = MagpieDecoder(model, graph_max_batch=2)
    decoder.reserve(sequences=1, max_frames=16, max_text_tokens=64)
    decoder.prepare_graphs()
    pool = decoder.transformer.pool
    pool.allocate(pool.rows + 1, positions=8, text_positions=8)
    assert decoder.graph_batches["decoder_step"] == 0
    assert decoder.advance_graphs.captured == [1, 2]
    assert not decoder.advance_graphs.covers(1)
    assert decoder.advance_graphs.captured == []


def test_a_checkpoint_finds_its_codec_beside_it_after_a_move(tiny_tts_path, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(tiny_tts_path, moved / "magpie.nemo")
    shutil.copy(tiny_tts_path.with_name("codec.nemo"), moved / "codec.nemo")
    original_codec = tiny_tts_path.with_name("codec.nemo")
    hidden = original_codec.rename(tmp_path / "elsewhere.nemo")
    try:
        assert load_magpie(str(moved / "magpie.nemo"), device="cpu").num_baked_speakers == 2
        (moved / "codec.nemo").unlink()
        with pytest.raises(FileNotFoundError, match="--codec"):
            load_magpie(str(moved / "magpie.nemo"), device="cpu")
        assert load_magpie(str(moved / "magpie.nemo"), device="cpu", codec=str(hidden)).num_baked_speakers == 2
    finally:
        hidden.rename(original_codec)


@pytest.mark.parametrize(
    ("eos_forbidden", "eos_forced"), [({}, {}), ({0: True, 2: True}, {}), ({1: True}, {1: True, 3: True})]
)
def test_the_eos_heads_argmax_equals_nemos_top1_sampling(model, eos_forbidden, eos_forced):
    heads = model.num_audio_codebooks * model.frame_stacking_factor
    logits = torch.randn(4, heads * model.num_all_tokens_per_codebook)
    logits[:, model.audio_eos_id] += 5.0  # EOS wins some heads unless forbidden
    ours = MagpieDecoder(model).argmax_codes(logits.clone(), _rows(eos_forbidden, 4), _rows(eos_forced, 4))
    nemo = model.sample_codes_from_logits(
        logits.clone(), temperature=0.01, topk=1, unfinished_items=eos_forbidden, finished_items=eos_forced
    )
    assert torch.equal(ours, nemo)


def _rows(items: dict[int, bool], batch: int) -> torch.Tensor:
    return torch.tensor([i in items for i in range(batch)])


@pytest.mark.parametrize("use_cfg", [True, False])
def test_code_sampling_draws_what_nemos_local_transformer_sampling_draws(model, use_cfg):
    """Same random numbers, same codes: row masks, masked_fill and the exponential race
    reproduce NeMo's dicts, boolean writes and torch.multinomial (which CUDA graphs cannot hold)."""
    sampler = CodeSampler(model)
    sampler.temperature = 0.8
    batch, forbidden, forced = 3, {0: True, 1: True}, {2: True}
    dec_output = torch.randn((2 if use_cfg else 1) * batch, model.cfg.decoder.d_model)
    with torch.inference_mode():
        torch.manual_seed(11)
        ours = sample_codes(sampler, dec_output, _rows(forbidden, batch), _rows(forced, batch))
        torch.manual_seed(11)
        nemo = model._lt_helper.sample_autoregressive(
            dec_output,
            temperature=0.8,
            topk=sampler.topk,
            unfinished_items=forbidden,
            finished_items=forced,
            use_cfg=use_cfg,
            cfg_scale=sampler.cfg_scale,
            use_kv_cache=sampler.use_kv_cache,
        )
    assert torch.equal(ours, nemo)
    assert len(torch.unique(ours[0])) > 1, "sampled, not constant"
    assert (ours[2] == model.audio_eos_id).all(), "a forced row only ends"


def test_sampling_in_a_larger_fixed_batch_gives_each_row_its_own_codes(model):
    """The CUDA-graph path (on a CPU a recorded replay over its buffers): 3 rows in a bucket of 4,
    the spare row holding stale values, give what sampling the 3 rows alone gives."""
    sampler = CodeSampler(model)
    graphed = GraphedSampler(sampler, model.cfg.decoder.d_model, use_cfg=True, max_batch=4)
    graphed.prepare_all()
    assert graphed.captured == [1, 2, 4]
    dec_output = torch.randn(6, model.cfg.decoder.d_model)
    forbidden, forced = _rows({1: True}, 3), _rows({2: True}, 3)
    with torch.inference_mode():
        graphed(torch.randn(8, model.cfg.decoder.d_model), _rows({}, 4), _rows({}, 4))  # stale rows
        ours = graphed(dec_output, forbidden, forced)
        alone = sample_codes(sampler, dec_output, forbidden, forced)
    assert torch.equal(ours, alone)
