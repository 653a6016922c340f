"""Codec frames to audio, in pieces, batched across sequences.

Magpie's NanoCodec decoder is causal (``CausalHiFiGANDecoder``): a frame's audio depends
only on earlier frames, within a receptive field of 26 frames (measured by perturbing one
frame; see docs/BENCHMARKS.md). Decoding new frames together with that much left context
therefore gives exactly the audio a one-shot decode gives: streamed chunks join without
seams. A shorter context is cheaper and only approximately equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from nemo.collections.common.parts.utils import mask_sequence_tensor
from nemo.collections.tts.modules.audio_codec_modules import CausalConv1dNorm
from torch.nn.utils import parametrize

from servers.common.cuda_graphs import FixedCall, GraphBuckets, bucket_rows, buckets_up_to, graph_pool

RECEPTIVE_FIELD_FRAMES = 26


class HostPaddedCausalConv1d(CausalConv1dNorm):
    """NeMo's causal convolution with its padding worked out in Python integers.

    NeMo computes the padding from 0-d tensors (its buffers), and ``F.pad`` then reads
    them back: on a GPU that is a wait for the GPU at every one of the codec's ~90
    convolutions, and no CUDA graph can hold it. Same arithmetic, same output.
    """

    host_padding: tuple[int, int, int]
    """Effective kernel size, stride and total padding, read from the buffers once."""

    def forward(self, inputs, input_len):
        length, (kernel, stride, total) = inputs.shape[-1], self.host_padding
        frames = -(-(length - kernel + total) // stride)  # ceil
        extra = frames * stride + kernel - total - length
        hidden = self._pad1d(inputs, (total, extra), mode=self.extra_pad_mode)
        return mask_sequence_tensor(self.activation(self.conv(hidden)), input_len)


def prepare_for_inference(decoder: torch.nn.Module) -> None:
    """Bake the codec decoder's weight norms into plain weights (NeMo recomputes each of
    them at every call) and give its causal convolutions host-side padding."""
    for module in decoder.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        if type(module) is CausalConv1dNorm:
            module.__class__ = HostPaddedCausalConv1d
            module.host_padding = (int(module.kernel_size), int(module.stride), int(module.padding_total))


@dataclass(frozen=True)
class DecodeRequest:
    codes: torch.Tensor
    """All of a sequence's speech codes so far ``(codebooks, frames)``."""
    start: int
    """First frame whose audio is wanted."""
    end: int
    """Frame after the last whose audio is wanted."""
    context: int
    """Earlier frames decoded along for continuity."""


GRAPH_MAX_ROWS = 8
"""Rows per codec graph: a step decodes audio for the segments whose audio is due, a few
(more go in several replays); larger buckets would hold much memory for little use."""
GRAPH_MAX_FRAMES = 64
"""Longest piece a codec graph decodes: a stream chunk with its context (26 + up to 16
frames). Longer requests (whole segments in batch mode) are cut into pieces this long,
each after the first with a receptive field of context: they join exactly, and a long
segment becomes one or a few replays instead of an eager call of ~7000 operations."""
GRAPH_MIN_FRAMES = 4


class CodecDecoder:
    def __init__(self, model, use_graphs: bool = False):
        """``use_graphs``: pieces of up to ``GRAPH_MAX_FRAMES`` frames decode from CUDA
        graphs (one per power-of-two row and frame count), captured by ``prepare_graphs``."""
        self._helper = model._codec_helper
        prepare_for_inference(self._helper.codec_model.audio_decoder)
        self.samples_per_frame = int(model.codec_model_samples_per_frame)
        self.device = next(model.parameters()).device
        self._codebooks = model.num_audio_codebooks
        self._graph_pool = graph_pool(self.device)
        self._buckets = GraphBuckets("TTS codec decode", self._prepare)
        self.use_graphs = use_graphs

    @property
    def captured(self) -> list[tuple[int, int]]:
        """(rows, frames) of each graph."""
        return self._buckets.captured

    @property
    def graph_batch(self) -> int:
        """Pieces one replay decodes; 0: every decode runs eagerly."""
        return GRAPH_MAX_ROWS if self.use_graphs else 0

    @torch.inference_mode()
    def prepare_graphs(self) -> None:
        """Capture every bucket now; if a capture fails, decode eagerly."""
        if self.use_graphs:
            frames = [f for f in buckets_up_to(GRAPH_MAX_FRAMES) if f >= GRAPH_MIN_FRAMES]
            self.use_graphs = self._buckets.prepare([(r, f) for r in buckets_up_to(GRAPH_MAX_ROWS) for f in frames])

    @torch.inference_mode()
    def decode(self, requests: list[DecodeRequest]) -> list[np.ndarray]:
        """Float32 audio for each request's frames ``[start, end)``: one codec call for all,
        or, with graphs, a replay per ``GRAPH_MAX_ROWS`` pieces of at most
        ``GRAPH_MAX_FRAMES`` frames.

        Rows are right-padded; the decoder being causal, padding never reaches valid audio.
        """
        if not self.use_graphs:
            return self._decode_at_once(requests)
        pieces = [_graph_sized(r) for r in requests]
        audio = iter(self._decode_graphed([p for parts in pieces for p in parts]))
        return [np.concatenate([next(audio) for _ in parts]) for parts in pieces]

    def _decode_at_once(self, requests: list[DecodeRequest]) -> list[np.ndarray]:
        codes = _codes_to_decode(requests)
        lengths = torch.tensor([c.shape[-1] for c in codes], device=self.device)
        audio, _, _ = self._helper.codes_to_audio(_right_padded(codes), lengths)
        return self._wanted(audio.float().cpu().numpy(), requests)

    def _decode_graphed(self, requests: list[DecodeRequest]) -> list[np.ndarray]:
        codes = _codes_to_decode(requests)
        audio = [a for i in range(0, len(codes), GRAPH_MAX_ROWS) for a in self._replay(codes[i : i + GRAPH_MAX_ROWS])]
        return self._wanted(audio, requests)

    def _wanted(self, audio, requests: list[DecodeRequest]) -> list[np.ndarray]:
        """Each request's frames ``[start, end)`` of its decoded row."""
        spf = self.samples_per_frame
        return [row[(r.start - _first(r)) * spf : (r.end - _first(r)) * spf] for row, r in zip(audio, requests)]

    def _replay(self, pieces: list[torch.Tensor]) -> np.ndarray:
        """Audio of up to ``GRAPH_MAX_ROWS`` pieces from the graph that holds them."""
        count, longest = len(pieces), max(p.shape[-1] for p in pieces)
        key = (bucket_rows(count), max(GRAPH_MIN_FRAMES, bucket_rows(longest)))
        bucket = self._buckets.get(key)
        codes, lengths = bucket.inputs
        codes[:count, :, :longest].copy_(_right_padded(pieces))
        lengths[:count].copy_(torch.tensor([p.shape[-1] for p in pieces]), non_blocking=True)
        return bucket()[:count].float().cpu().numpy()

    def _prepare(self, key: tuple[int, int]) -> FixedCall:
        rows, frames = key
        inputs = (
            torch.zeros(rows, self._codebooks, frames, dtype=torch.long, device=self.device),
            torch.full((rows,), frames, dtype=torch.long, device=self.device),
        )
        return FixedCall(
            lambda codes, lengths: self._helper.codes_to_audio(codes, lengths)[0], inputs, self._graph_pool
        )


def _first(request: DecodeRequest) -> int:
    """The first frame a request decodes, its context included."""
    return max(0, request.start - request.context)


def _codes_to_decode(requests: list[DecodeRequest]) -> list[torch.Tensor]:
    return [r.codes[:, _first(r) : r.end] for r in requests]


def _graph_sized(request: DecodeRequest) -> list[DecodeRequest]:
    """The request as pieces of at most ``GRAPH_MAX_FRAMES`` frames, context included;
    every piece after the first has a receptive field of context (or all there is since
    the request's first frame), so each decodes what one decode of the whole would."""
    first, start = _first(request), request.start
    context, pieces = start - first, []
    while True:
        end = min(request.end, start + GRAPH_MAX_FRAMES - context)
        pieces.append(DecodeRequest(request.codes, start, end, context))
        if end == request.end:
            return pieces
        start, context = end, min(RECEPTIVE_FIELD_FRAMES, end - first)


def _right_padded(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Pieces ``(codebooks, frames)`` as one batch ``(rows, codebooks, longest)``."""
    return torch.nn.utils.rnn.pad_sequence([p.T for p in pieces], batch_first=True).transpose(1, 2)
