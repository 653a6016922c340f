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


class CodecDecoder:
    def __init__(self, model):
        self._helper = model._codec_helper
        prepare_for_inference(self._helper.codec_model.audio_decoder)
        self.samples_per_frame = int(model.codec_model_samples_per_frame)
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def decode(self, requests: list[DecodeRequest]) -> list[np.ndarray]:
        """Float32 audio for each request's frames ``[start, end)``, one codec call for all.

        Rows are right-padded; the decoder being causal, padding never reaches valid audio.
        """
        firsts = [max(0, r.start - r.context) for r in requests]
        pieces = [r.codes[:, first : r.end] for r, first in zip(requests, firsts)]
        lengths = torch.tensor([p.shape[-1] for p in pieces], device=self.device)
        batch = torch.nn.utils.rnn.pad_sequence([p.T for p in pieces], batch_first=True).transpose(1, 2)
        audio, _, _ = self._helper.codes_to_audio(batch, lengths)
        audio = audio.float().cpu().numpy()
        spf = self.samples_per_frame
        return [
            audio[i, (r.start - first) * spf : (r.end - first) * spf]
            for i, (r, first) in enumerate(zip(requests, firsts))
        ]
