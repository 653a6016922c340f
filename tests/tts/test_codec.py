"""The codec decoder, prepared for serving, decodes what NeMo's decodes without reading
anything back from the device."""

from __future__ import annotations

import pytest
import torch

from servers.tts.codec import CodecDecoder, DecodeRequest
from servers.tts.model import load_magpie
from tests.host_reads import HOST_READS, operations


@pytest.fixture(scope="module")
def models(tiny_tts_path):
    """Two copies of one checkpoint: one served by ``CodecDecoder``, one as NeMo left it."""
    return load_magpie(str(tiny_tts_path), device="cpu"), load_magpie(str(tiny_tts_path), device="cpu")


def _codes(model, frames: int) -> torch.Tensor:
    return torch.randint(
        0, model.codebook_size, (model.num_audio_codebooks, frames), generator=torch.Generator().manual_seed(0)
    )


def test_the_prepared_codec_decodes_exactly_what_nemos_decodes(models):
    served, pristine = models
    codes = _codes(served, 40)
    requests = [
        DecodeRequest(codes, start=26, end=34, context=26),
        DecodeRequest(codes[:, :20], start=0, end=20, context=0),
    ]
    decoded = CodecDecoder(served).decode(requests)
    lengths = torch.tensor([34, 20])
    batch = torch.stack([codes[:, :34], torch.nn.functional.pad(codes[:, :20], (0, 14))])
    with torch.inference_mode():
        expected, _, _ = pristine._codec_helper.codes_to_audio(batch, lengths)
    spf = CodecDecoder(served).samples_per_frame
    assert torch.equal(torch.from_numpy(decoded[0]), expected[0, 26 * spf : 34 * spf])
    assert torch.equal(torch.from_numpy(decoded[1]), expected[1, : 20 * spf])


def test_a_decode_reads_no_value_back_from_the_device_and_recomputes_no_weight_norm(models):
    served, _ = models
    codec = CodecDecoder(served)
    ops = operations(lambda: codec.decode([DecodeRequest(_codes(served, 40), start=26, end=34, context=26)]))
    assert "aten::convolution" in ops
    assert not ops & HOST_READS
    assert "aten::_weight_norm" not in ops


def test_graph_buckets_decode_what_one_eager_call_decodes(models):
    """The CUDA-graph path (on a CPU a recorded replay over its fixed buffers): pieces of different
    lengths, more than one bucket holds, each padded to its bucket's rows and frames."""
    served, _ = models
    graphed, eager = CodecDecoder(served, use_graphs=True), CodecDecoder(served)
    requests = [
        DecodeRequest(_codes(served, 12 + 3 * i), start=max(0, 9 + 3 * i - 26), end=12 + 3 * i, context=26)
        for i in range(10)
    ]
    for mine, expected in zip(graphed.decode(requests), eager.decode(requests)):
        assert mine.shape == expected.shape and abs(mine - expected).max() < 1e-6
    assert graphed.captured == [(2, 64), (8, 64)]


def test_long_requests_decode_from_graph_sized_pieces_that_join_exactly(models):
    """A whole batch-mode segment is longer than any codec graph: it is decoded as pieces
    that fit one, each after the first with a receptive field of context, and the joined
    audio is what one eager decode of the whole gives."""
    served, _ = models
    graphed, eager = CodecDecoder(served, use_graphs=True), CodecDecoder(served)
    requests = [
        DecodeRequest(_codes(served, 150), start=0, end=150, context=26),  # a whole segment
        DecodeRequest(_codes(served, 120), start=40, end=117, context=8),  # a long late piece
        DecodeRequest(_codes(served, 30), start=22, end=30, context=26),  # a stream chunk
    ]
    for mine, expected in zip(graphed.decode(requests), eager.decode(requests)):
        assert mine.shape == expected.shape and abs(mine - expected).max() < 1e-5
    assert graphed.captured == [(8, 64)], "seven pieces in one replay"
