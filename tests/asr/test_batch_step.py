"""The batched streaming step is exact: streamed == offline, batch rows == each stream alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from servers.asr.batch_step import BatchedStreamingStep, StepRow
from servers.asr.features import UtteranceAudio
from servers.asr.model import load_streaming_model, read_geometry
from tests.asr.helpers import use_nemo_cuda_graphs_decoder


@dataclass
class _Stream:
    audio: UtteranceAudio
    padding: int
    slot: int
    starts_at: int
    started: bool = False
    done: bool = False
    encoded: list = field(default_factory=list)
    tokens: list = field(default_factory=list)


def _stream_all(step: BatchedStreamingStep, utterances, starts, padding_ms=0.0, long_finals=False, mixed_steps=None):
    """Stream whole utterances through ``step`` as the engine would, stream ``i`` joining
    at tick ``starts[i]``. A final chunk is never longer than a regular one, or, with
    ``long_finals``, up to the engine's longest; ``mixed_steps`` collects the ticks where
    a long final ran beside a continuing row."""
    g = step.geometry
    padding = g.ms_to_samples(g.finalize_audio_ms - padding_ms)
    streams = []
    for utterance, start in zip(utterances, starts):
        audio = UtteranceAudio(g)
        audio.append(utterance)
        slot = step.pool.acquire()
        step.pool.reset([slot])
        streams.append(_Stream(audio, padding, slot, start))
    tick = 0
    while not all(s.done for s in streams):
        active = [s for s in streams if not s.done and s.starts_at <= tick]
        rows = []
        for s in active:
            chunk = g.chunk_frames if s.started else g.first_chunk_frames
            remaining = s.audio.frames_with_padding(s.padding)
            final = remaining <= (max(chunk, g.max_final_frames) if long_finals else chunk)
            request = s.audio.take(remaining if final else chunk, s.padding)
            rows.append(StepRow(s.slot, request, first=not s.started, final=final))
        if mixed_steps is not None and any(r.final and r.request.count > g.chunk_frames for r in rows):
            if not all(r.final for r in rows):
                mixed_steps.append(tick)
        if rows:
            out = step.run(rows)
            for i, (s, row) in enumerate(zip(active, rows)):
                s.encoded.append(out.encoded[i, :, : out.encoded_len[i]])
                s.tokens += out.tokens[i]
                s.started, s.done = True, row.final
                if row.final:
                    step.pool.release(s.slot)
        tick += 1
    return [(torch.cat(s.encoded, dim=1), s.tokens) for s in streams], padding


def _offline_encoder(model, audio: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        features, n = model.preprocessor(input_signal=torch.from_numpy(audio)[None], length=torch.tensor([len(audio)]))
        encoded, length = model.encoder(audio_signal=features, length=n)
    return encoded[0, :, : length.item()]


@pytest.mark.parametrize("right_context", [1, 6, 13])
def test_streamed_encoder_output_equals_full_utterance_pass(tiny_asr_path, speech, right_context):
    model = load_streaming_model(str(tiny_asr_path), right_context=right_context, device="cpu")
    step = BatchedStreamingStep(model, read_geometry(model, right_context), max_sessions=4)
    utterance = speech[: 16000 * 4 + 777]
    [(streamed, _)], padding = _stream_all(step, [utterance], [0])
    offline = _offline_encoder(model, np.concatenate([utterance, np.zeros(padding, np.float32)]))
    assert streamed.shape == offline.shape
    torch.testing.assert_close(streamed, offline, rtol=0, atol=1e-4)


def _nemo_streamed_encoder(model, audio: np.ndarray) -> torch.Tensor:
    """NeMo's own cache-aware streaming of ``audio``: its buffer's chunks, its step."""
    from nemo.collections.asr.parts.utils.streaming_utils import CacheAwareStreamingAudioBuffer

    buffer = CacheAwareStreamingAudioBuffer(model=model, online_normalization=False)
    buffer.append_audio(audio)
    cache = model.encoder.get_initial_cache_state(batch_size=1)
    pieces = []
    with torch.no_grad():
        for i, (chunk, lengths) in enumerate(buffer):
            encoded, encoded_len, *cache = model.encoder.cache_aware_stream_step(
                chunk,
                lengths,
                *cache,
                keep_all_outputs=buffer.is_buffer_empty(),
                drop_extra_pre_encoded=0 if i == 0 else model.encoder.streaming_cfg.drop_extra_pre_encoded,
            )
            pieces.append(encoded[0, :, : encoded_len[0]])
    return torch.cat(pieces, dim=1)


def test_streamed_encoder_output_at_no_right_context_equals_nemos_own_streaming(tiny_asr_path, speech):
    """At R = 0 the first chunk is shorter than the pre-encode cache, zero-filled as NeMo's
    streaming buffer does, so the output differs from the whole-utterance pass (by about
    1e-2 here) but not from NeMo's streaming; the last frame, which NeMo's buffer leaves
    out, the final step keeps, as the whole-utterance pass has it."""
    model = load_streaming_model(str(tiny_asr_path), right_context=0, device="cpu")
    step = BatchedStreamingStep(model, read_geometry(model, 0), max_sessions=4)
    utterance = speech[: 16000 * 4 + 777]
    [(streamed, _)], padding = _stream_all(step, [utterance], [0])
    padded = np.concatenate([utterance, np.zeros(padding, np.float32)])
    nemo = _nemo_streamed_encoder(model, padded)
    assert streamed.shape == _offline_encoder(model, padded).shape
    assert streamed.shape[1] - nemo.shape[1] in (0, 1)
    torch.testing.assert_close(streamed[:, : nemo.shape[1]], nemo, rtol=0, atol=1e-4)


@pytest.mark.parametrize("decoder", ["label_looping", "cuda_graphs_impl"])
def test_batch_rows_equal_each_stream_alone(tiny_asr_path, speech, decoder):
    """Streams that join at different ticks and end at different ticks (first chunks,
    steady chunks and finals in the same steps, and batches that shrink) get exactly what
    each gets alone."""
    model = load_streaming_model(str(tiny_asr_path), right_context=1, device="cpu")
    step = BatchedStreamingStep(model, read_geometry(model, 1), max_sessions=8, initial_slots=2)
    if decoder == "cuda_graphs_impl":
        use_nemo_cuda_graphs_decoder(step)  # it answers for the largest batch it has seen
    utterances = [
        speech[16000 * 1 : 16000 * 5],
        speech[16000 * 6 : 16000 * 8 + 500],
        np.zeros(16000 * 2, np.float32),
        speech[16000 * 9 : 16000 * 15 + 1234],
    ]
    starts = [0, 3, 5, 1]
    together, _ = _stream_all(step, utterances, starts, padding_ms=200)
    assert step.pool.in_use == 0
    for utterance, (encoded, tokens) in zip(utterances, together):
        [(encoded_alone, tokens_alone)], _ = _stream_all(step, [utterance], [0], padding_ms=200)
        torch.testing.assert_close(encoded, encoded_alone, rtol=0, atol=1e-4)
        assert tokens == tokens_alone
    assert any(tokens for _, tokens in together), "the tiny model should emit text for speech"
    assert together[2][1] == [], "silence should give no text"


def test_long_finals_finish_in_one_step_beside_continuing_rows(tiny_asr_path, speech):
    """A final longer than a chunk (all the finalize padding at once) runs in the same step
    as continuing rows, in a conformer call of its own, and everyone gets what they get alone."""
    model = load_streaming_model(str(tiny_asr_path), right_context=1, device="cpu")
    step = BatchedStreamingStep(model, read_geometry(model, 1), max_sessions=8)
    utterances = [speech[16000 * 1 : 16000 * 3 + 300], speech[16000 * 4 : 16000 * 9], speech[16000 * 9 : 16000 * 11]]
    mixed: list[int] = []
    together, _ = _stream_all(step, utterances, [0, 1, 2], long_finals=True, mixed_steps=mixed)
    assert mixed, "some step should mix a long final with continuing rows"
    for utterance, (encoded, tokens) in zip(utterances, together):
        [(encoded_alone, tokens_alone)], _ = _stream_all(step, [utterance], [0], long_finals=True)
        torch.testing.assert_close(encoded, encoded_alone, rtol=0, atol=1e-4)
        assert tokens == tokens_alone


@pytest.mark.parametrize(
    ("device", "autocast_dtype"),
    [
        ("cpu", None),
        ("cpu", torch.bfloat16),  # the GPU's default precision: caches kept in bf16
        pytest.param("cuda", None, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
    ],
    ids=["cpu", "cpu-bf16", "cuda"],
)
def test_steps_run_in_fixed_size_buckets_equal_eager_steps(tiny_asr_path, speech, device, autocast_dtype):
    """The CUDA-graph path (on a CPU a recorded replay over its buffers): a batch of B rows in a bucket
    of 2^k rows, the other rows holding stale state, gives what an eager step gives."""
    model = load_streaming_model(str(tiny_asr_path), right_context=1, device=device)
    geometry = read_geometry(model, 1)
    utterances = [speech[16000 * 1 : 16000 * 4], speech[16000 * 6 : 16000 * 8 + 500], speech[16000 * 9 : 16000 * 13]]
    starts = [0, 2, 4]
    eager_step = BatchedStreamingStep(model, geometry, max_sessions=4, autocast_dtype=autocast_dtype)
    eager, _ = _stream_all(eager_step, utterances, starts)
    bucketed_step = BatchedStreamingStep(
        model, geometry, max_sessions=4, graph_max_batch=3, autocast_dtype=autocast_dtype
    )
    bucketed, _ = _stream_all(bucketed_step, utterances, starts)
    graphs = bucketed_step.encoder_graphs
    assert [rows for rows, _ in graphs.captured] == [1, 2, 4], "batches of 1, 2 and 3 rows ran in buckets"
    assert graphs.eager_steps == 0, "steps of final chunks alone ran in buckets too"
    for (encoded, tokens), (encoded_eager, tokens_eager) in zip(bucketed, eager):
        # On a GPU, cuDNN may pick other (TF32) kernels for other batch sizes.
        torch.testing.assert_close(encoded, encoded_eager, rtol=0, atol=1e-5 if device == "cpu" else 1e-3)
        assert tokens == tokens_eager
