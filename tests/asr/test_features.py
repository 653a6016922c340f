"""Incremental features equal the preprocessor's pass over the whole utterance."""

import statistics
import time

import numpy as np
import pytest
import torch

from servers.asr.features import FeatureBatch, UtteranceAudio, compute_features
from servers.asr.model import load_streaming_model, read_geometry


def _whole_utterance_features(model, audio: np.ndarray) -> torch.Tensor:
    signal = torch.from_numpy(audio)[None]
    with torch.no_grad():
        features, n = model.preprocessor(input_signal=signal, length=torch.tensor([len(audio)]))
    return features[0, :, : n.item()]


def test_chunked_features_equal_whole_utterance_pass(tiny_asr_path, speech):
    model = load_streaming_model(str(tiny_asr_path), right_context=1, device="cpu")
    g = read_geometry(model, 1)
    audio = UtteranceAudio(g)
    rng = np.random.default_rng(0)
    utterance = speech[: 16000 * 5 + 123]
    pieces, position, largest_buffer = [], 0, 0
    while position < len(utterance):
        size = int(rng.integers(1, 4000))
        audio.append(utterance[position : position + size])
        position += size
        need = g.first_chunk_frames if not pieces else g.chunk_frames
        while audio.ready_frames() >= need:
            pieces.append(compute_features(model.preprocessor, [audio.take(need)], torch.device("cpu")).row(0))
            need = g.chunk_frames
        largest_buffer = max(largest_buffer, audio.buffered_samples)
    padding = g.ms_to_samples(g.finalize_audio_ms - 200)
    last = audio.take(audio.frames_with_padding(padding), padding)
    pieces.append(compute_features(model.preprocessor, [last], torch.device("cpu")).row(0))

    streamed = torch.cat(pieces, dim=1)
    whole = _whole_utterance_features(model, np.concatenate([utterance, np.zeros(padding, np.float32)]))
    assert streamed.shape == whole.shape
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)
    # Only a chunk, its look-ahead and left context (plus one uneven push) are ever held.
    assert largest_buffer <= (g.chunk_frames + g.left_context_frames + 1) * g.hop + g.n_fft + 4000


def test_chunks_before_the_end_of_a_finished_utterance_read_only_their_own_audio(tiny_asr_path, speech):
    """A client far ahead of the engine (a file, or a backlog) then ends its utterance:
    until its last chunk, each chunk's snippet is a chunk long, not the rest of the
    utterance (which made every step's features, and their copy to the GPU, grow with the
    backlog), and the frames still equal a whole-utterance pass."""
    model = load_streaming_model(str(tiny_asr_path), right_context=1, device="cpu")
    g = read_geometry(model, 1)
    utterance = speech[: 16000 * 10]
    padding = g.ms_to_samples(g.finalize_audio_ms)
    audio = UtteranceAudio(g)
    audio.append(utterance)
    pieces, longest = [], 0
    need = g.first_chunk_frames
    while audio.frames_with_padding(padding) > max(need, g.max_final_frames):
        request = audio.take(need, padding)
        longest = max(longest, len(request.audio))
        pieces.append(compute_features(model.preprocessor, [request], torch.device("cpu")).row(0))
        need = g.chunk_frames
    last = audio.take(audio.frames_with_padding(padding), padding)
    pieces.append(compute_features(model.preprocessor, [last], torch.device("cpu")).row(0))
    whole = _whole_utterance_features(model, np.concatenate([utterance, np.zeros(padding, np.float32)]))
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-5)
    assert longest <= g.samples_for_frames(g.chunk_frames + g.left_context_frames)


def test_batched_feature_requests_equal_each_alone(tiny_asr_path, speech):
    model = load_streaming_model(str(tiny_asr_path), right_context=1, device="cpu")
    g = read_geometry(model, 1)
    requests = []
    for start, length, padding in ((0, 4000, None), (20000, 9000, None), (50000, 3000, 1920)):
        audio = UtteranceAudio(g)
        audio.append(speech[start : start + length])
        count = audio.frames_with_padding(padding) if padding else audio.ready_frames()
        requests.append(audio.take(count, padding))
    together = compute_features(model.preprocessor, requests, torch.device("cpu"))
    for i, request in enumerate(requests):
        batched = together.row(i)
        alone = compute_features(model.preprocessor, [request], torch.device("cpu")).row(0)
        torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("starts", [[2, 2, 2], [0, 3, 1]])
def test_a_group_of_rows_takes_the_same_frames_as_each_row(starts):
    batch = FeatureBatch(torch.randn(3, 5, 9), starts, [4, 4, 4])
    torch.testing.assert_close(
        batch.frames([2, 0], torch.tensor([2, 0])), torch.stack([batch.row(2), batch.row(0)]), rtol=0, atol=0
    )


def test_appending_costs_the_same_however_much_audio_waits(tiny_asr_path):
    """A client may send up to ``max_buffered_s`` ahead in small frames: an append must not
    copy what is already waiting (that made sending 30 s ahead in 20 ms frames quadratic).
    Medians of per-frame times, compared as a ratio."""
    model = load_streaming_model(str(tiny_asr_path), right_context=1, device="cpu")
    audio = UtteranceAudio(read_geometry(model, 1))
    frame = np.zeros(320, np.float32)
    seconds = []
    for _ in range(1500):  # 30 s of 20 ms frames, none transcribed
        started = time.perf_counter()
        audio.append(frame)
        seconds.append(time.perf_counter() - started)
    assert audio.buffered_samples == 1500 * 320
    assert statistics.median(seconds[-300:]) < 3 * statistics.median(seconds[:300])
