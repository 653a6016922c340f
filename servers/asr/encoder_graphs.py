"""The conformer call of a streaming step, replayed from CUDA graphs.

Eager NeMo spends ~50 ms of CPU time launching ~5 ms of GPU work per step on an H100,
so one stream costs almost as much as hundreds. A CUDA graph launches the whole call at
once. Graphs have fixed shapes, so there is one per batch-size bucket (powers of two),
captured the first time a batch needs it: a step of B rows runs in the smallest bucket
that holds B. Rows beyond B keep whatever finite values they last held; conformer rows
never mix (per-row attention, convolution, normalisation in eval mode), so they cannot
change the real rows. Steps whose rows are not the steady width (only final chunks)
or that exceed the largest bucket run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from loguru import logger

EncoderOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``encoded [B, d, T]``, ``encoded_len [B]`` and the next caches (channel, time, channel length)."""


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


@dataclass
class _Bucket:
    inputs: tuple[torch.Tensor, ...]
    outputs: EncoderOutputs | None = None
    graph: torch.cuda.CUDAGraph | None = None


class GraphedEncoderStep:
    """Callable like ``eager_encoder_step`` without its first two arguments.

    On a CPU there is nothing to capture: the buckets' fixed buffers are run eagerly, which
    is how tests check the padding and slicing that the GPU path shares.
    """

    def __init__(self, encoder, *, out_frames: int, autocast_dtype: torch.dtype | None, max_batch: int):
        self._encoder = encoder
        self._out_frames = out_frames
        self._autocast_dtype = autocast_dtype
        self.max_batch = max_batch
        self._device = next(encoder.parameters()).device
        self._buckets: dict[int, _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if self._device.type == "cuda" else None

    @property
    def captured(self) -> list[int]:
        """Bucket sizes that have a graph (or, on a CPU, fixed buffers)."""
        return sorted(self._buckets)

    def bucket_for(self, batch: int) -> int | None:
        """The bucket a batch of ``batch`` steady rows runs in; None: eagerly."""
        if batch > self.max_batch:
            return None
        return 1 << (batch - 1).bit_length()

    def __call__(self, *inputs: torch.Tensor) -> EncoderOutputs:
        x = inputs[0]
        size = self.bucket_for(x.shape[0]) if x.shape[1] == self._out_frames else None
        if size is None:
            return eager_encoder_step(self._encoder, self._autocast_dtype, *inputs)
        bucket = self._buckets.get(size) or self._prepare(size, inputs)
        rows = x.shape[0]
        for static, value in zip(bucket.inputs, inputs):
            batch_dim = 1 if static.dim() == 4 else 0
            static.narrow(batch_dim, 0, rows).copy_(value)
        if bucket.graph is not None:
            bucket.graph.replay()
            outputs = bucket.outputs
        else:
            outputs = eager_encoder_step(self._encoder, self._autocast_dtype, *bucket.inputs)
        encoded, encoded_len, channel, time_, channel_len = outputs
        return (
            encoded[:rows].clone(),
            encoded_len[:rows].clone(),
            channel[:, :rows].clone(),
            time_[:, :rows].clone(),
            channel_len[:rows].clone(),
        )

    def _prepare(self, size: int, example: tuple[torch.Tensor, ...]) -> _Bucket:
        """Fixed buffers holding a fresh session's state and a full steady chunk (valid
        values in every row); on a GPU, the graph captured over them."""
        x, lengths, channel, time_, channel_len = example
        channel0, time0, channel_len0 = self._encoder.get_initial_cache_state(batch_size=size, device=self._device)
        inputs = (
            x.new_zeros(size, *x.shape[1:]),
            lengths.new_full((size,), self._out_frames),
            channel0.to(channel.dtype),
            time0.to(time_.dtype),
            channel_len0.to(channel_len.dtype),
        )
        bucket = _Bucket(inputs)
        if self._pool is not None:
            bucket.graph, bucket.outputs = self._capture(inputs)
            logger.info(f"ASR encoder step captured as a CUDA graph for {size} rows")
        self._buckets[size] = bucket
        return bucket

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.cuda.CUDAGraph, EncoderOutputs]:
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(2):  # kernels chosen, workspaces and lazy buffers allocated
                eager_encoder_step(self._encoder, self._autocast_dtype, *inputs)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (other engines in the process) may use the GPU meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = eager_encoder_step(self._encoder, self._autocast_dtype, *inputs)
        return graph, outputs
