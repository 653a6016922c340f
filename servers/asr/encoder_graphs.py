"""The conformer call of a streaming step, replayed from CUDA graphs.

Eager NeMo spends ~50 ms of CPU time launching ~5 ms of GPU work per step on an H100,
so one stream costs almost as much as hundreds. A CUDA graph launches the whole call at
once. Graphs have fixed shapes, so there is one per bucket: a number of rows (a power of
two) and a width (encoder frames). A step of B rows runs in the smallest bucket that
holds B. Rows beyond B keep whatever finite values they last held; conformer rows never
mix (per-row attention, convolution, normalisation in eval mode), so they cannot change
the real rows. Rows narrower than their bucket (final chunks) are zero-padded on the
right and masked by their lengths, as in any mixed step.

A call is a steady chunk wide, or, for the final rows longer than a chunk that a step
runs in a call of their own (``batch_step``), up to the longest final wide. Few sessions
finish in the same step, so those buckets stop at ``max_final_batch`` rows; more run
eagerly.

All buckets are captured while the engine warms up: a capture on first use would stall
every stream for up to a second when load grows, and while one is under way no other
thread in the process may draw random numbers on the GPU (the TTS sampler would fail).
"""

from __future__ import annotations

import functools
import time

import torch
from loguru import logger

from servers.common.cuda_graphs import FixedCall, bucket_rows, buckets_up_to, graph_pool

EncoderOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``encoded [B, d, T]``, ``encoded_len [B]`` and the next caches (channel, time, channel length)."""


def batch_dim(tensor: torch.Tensor) -> int:
    """The rows' dimension of a step input or output: the caches of all layers are
    ``[layers, B, ...]``, everything else starts with B."""
    return 1 if tensor.dim() == 4 else 0


def eager_encoder_step(encoder, autocast_dtype: torch.dtype | None, *inputs: torch.Tensor) -> EncoderOutputs:
    """NeMo's cache-aware step on pre-encoded input ``x [B, T, d]`` with lengths and caches."""
    x, lengths, channel, time_, channel_len = inputs
    # Autocast's weight-cast cache must be off inside a graph capture; the casts are
    # then part of the graph.
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None, cache_enabled=False):
        return encoder.cache_aware_stream_step(
            processed_signal=x,
            processed_signal_length=lengths,
            cache_last_channel=channel,
            cache_last_time=time_,
            cache_last_channel_len=channel_len,
            keep_all_outputs=True,
            bypass_pre_encode=True,
        )


class GraphedEncoderStep:
    """Callable like ``eager_encoder_step`` without its first two arguments.

    The next caches it returns are views of the graph's buffers, valid until a step of
    the same bucket runs again: the caller stores them at once (they are the largest
    tensors of a step, and a copy of them costs as much as the state pool's own writes).

    On a CPU there is nothing to capture: the buckets' fixed buffers are run eagerly, which
    is how tests check the padding and slicing that the GPU path shares.
    """

    def __init__(
        self,
        encoder,
        *,
        out_frames: int,
        final_out_frames: int,
        autocast_dtype: torch.dtype | None,
        max_batch: int,
        max_final_batch: int = 8,
    ):
        self._encoder = encoder
        self._limits = {final_out_frames: min(max_batch, max_final_batch)}
        self._limits[out_frames] = max_batch
        """Most rows per step run in a bucket, by width (steady chunks win if finals are no wider)."""
        self._autocast_dtype = autocast_dtype
        self._device = next(encoder.parameters()).device
        self._buckets: dict[tuple[int, int], FixedCall] = {}
        self.eager_steps = 0
        """Steps that fell back to eager NeMo (more rows than any bucket holds)."""
        self._pool = graph_pool(self._device)

    @property
    def captured(self) -> list[tuple[int, int]]:
        """``(rows, width)`` of the buckets that have a graph (or, on a CPU, fixed buffers)."""
        return sorted(self._buckets)

    def bucket_for(self, rows: int, frames: int) -> tuple[int, int] | None:
        """The bucket a step of ``rows`` rows ``frames`` wide runs in; None: eagerly."""
        width = min((w for w in self._limits if w >= frames), default=None)
        if width is None or rows > self._limits[width]:
            return None
        return bucket_rows(rows), width

    def prepare_all(self) -> None:
        """Capture every bucket now. A step must have run: its inputs set the dtypes and
        per-row shapes."""
        if not self._buckets:
            raise RuntimeError("run one encoder step before preparing the other buckets")
        example = next(iter(self._buckets.values())).inputs
        started, reserved = time.perf_counter(), self._reserved_gib()
        wanted = [(rows, width) for width, limit in self._limits.items() for rows in buckets_up_to(limit)]
        for key in sorted(set(wanted) - self._buckets.keys(), reverse=True):
            self._prepare(key, example)
        logger.info(
            f"ASR encoder step: {len(self._buckets)} buckets ready in {time.perf_counter() - started:.1f} s; "
            f"GPU memory reserved {reserved:.1f} -> {self._reserved_gib():.1f} GiB"
        )

    def _reserved_gib(self) -> float:
        return torch.cuda.memory_reserved(self._device) / 2**30 if self._pool is not None else 0.0

    def __call__(self, *inputs: torch.Tensor) -> EncoderOutputs:
        x = inputs[0]
        rows, frames = x.shape[:2]
        key = self.bucket_for(rows, frames)
        if key is None:
            self.eager_steps += 1
            return eager_encoder_step(self._encoder, self._autocast_dtype, *inputs)
        bucket = self._buckets.get(key) or self._prepare(key, inputs)
        static_x = bucket.inputs[0].narrow(0, 0, rows)
        static_x[:, :frames].copy_(x)
        static_x[:, frames:].zero_()
        for static, value in zip(bucket.inputs[1:], inputs[1:]):
            static.narrow(batch_dim(static), 0, rows).copy_(value)
        encoded, encoded_len, channel, time_, channel_len = bucket()
        return (
            encoded[:rows].clone(),
            encoded_len[:rows].clone(),
            channel[:, :rows],
            time_[:, :rows],
            channel_len[:rows],
        )

    def _prepare(self, key: tuple[int, int], example: tuple[torch.Tensor, ...]) -> FixedCall:
        """Fixed buffers holding a fresh session's state and a full chunk (valid values in
        every row); on a GPU, the graph captured over them."""
        rows, width = key
        x, lengths, channel, time_, channel_len = example
        channel0, time0, channel_len0 = self._encoder.get_initial_cache_state(batch_size=rows, device=self._device)
        inputs = (
            x.new_zeros(rows, width, x.shape[2]),
            lengths.new_full((rows,), width),
            channel0.to(channel.dtype),
            time0.to(time_.dtype),
            channel_len0.to(channel_len.dtype),
        )
        bucket = FixedCall(
            functools.partial(eager_encoder_step, self._encoder, self._autocast_dtype), inputs, self._pool
        )
        if self._pool is not None:
            logger.debug(f"ASR encoder step captured as a CUDA graph for {rows} rows of {width} frames")
        self._buckets[key] = bucket
        return bucket
