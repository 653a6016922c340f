"""The conformer call of a streaming step, replayed from CUDA graphs.

Eager NeMo spends ~50 ms of CPU time launching ~5 ms of GPU work per step on an H100,
so one stream costs almost as much as hundreds. A CUDA graph launches the whole call at
once. Graphs have fixed shapes, so there is one per bucket: a number of rows (a power of
two) and a width (encoder frames). A step of B rows runs in the smallest bucket that
holds B. Rows beyond B run the state pool's scratch slot on whatever finite input they
last held; conformer rows never mix (per-row attention, convolution, normalisation in
eval mode), so they cannot change the real rows. Rows narrower than their bucket (final
chunks) are zero-padded on the right and masked by their lengths, as in any mixed step.

The graph reads the sessions' caches from the state pool and writes them back itself, by
slot index: caches are the largest tensors of a step, and copying them into and out of a
graph's own buffers (and casting them) took more of an H100's time than the model's
matrix products at 512 rows. The pool keeps them in the autocast dtype, which is all the
conformer reads of them (they only feed linear layers and a convolution).

A call is a steady chunk wide, or, for the final rows longer than a chunk that a step
runs in a call of their own (``batch_step``), up to the longest final wide. Fewer
sessions finish in a step than stream in it (at 160 ms chunks and utterances of a few
seconds, about one in twenty), so those buckets stop at an eighth of the steady ones (at
least 8 rows); more run eagerly.

All buckets are captured while the engine warms up: a capture on first use would stall
every stream for up to a second when load grows, and while one is under way no other
thread in the process may draw random numbers on the GPU (the TTS sampler would fail).
"""

from __future__ import annotations

import functools
import time

import torch
from loguru import logger

from servers.asr.state_pool import SCRATCH_SLOT, StatePool
from servers.common.cuda_graphs import FixedCall, GraphBuckets, bucket_rows, buckets_up_to, graph_pool
from servers.common.precision import autocast

ENCODER_CACHES = ("cache_last_channel", "cache_last_time", "cache_last_channel_len")
"""The encoder's per-session state in the ``StatePool``, named as NeMo's step takes it."""


def encoder_step(
    encoder, autocast_dtype: torch.dtype | None, pool: StatePool, x: torch.Tensor, lengths: torch.Tensor, slots
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeMo's cache-aware step on pre-encoded input ``x [B, T, d]`` of the sessions in
    ``slots``: ``encoded [B, d, T']`` and its lengths. The sessions' caches are read from
    the pool and their next caches written back within the call, so that a CUDA graph of
    it moves each cache once each way and copies none into or out of its own buffers."""
    caches = pool.gather(slots, ENCODER_CACHES)
    with autocast(x.device.type, autocast_dtype):
        encoded, encoded_len, *next_caches = encoder.cache_aware_stream_step(
            processed_signal=x,
            processed_signal_length=lengths,
            **caches,
            keep_all_outputs=True,
            bypass_pre_encode=True,
        )
    pool.scatter(slots, dict(zip(ENCODER_CACHES, next_caches)))
    return encoded, encoded_len


class GraphedEncoderStep:
    """Callable like ``encoder_step`` without its first three arguments.

    A bucket's padding rows read and write the pool's scratch slot, so they never touch a
    session's state. The pool must never grow: a graph holds its tensors' addresses.

    On a CPU ``FixedCall`` records and replays each bucket instead, which is how tests check
    the padding and slicing that the GPU path shares.
    """

    def __init__(
        self,
        encoder,
        pool: StatePool,
        *,
        out_frames: int,
        final_out_frames: int,
        autocast_dtype: torch.dtype | None,
        max_batch: int,
    ):
        if not pool.fixed:
            raise ValueError("CUDA graphs need a state pool made at its full size")
        self._step = functools.partial(encoder_step, encoder, autocast_dtype, pool)
        self._limits = {final_out_frames: min(max_batch, max(8, max_batch // 8))}
        self._limits[out_frames] = max_batch
        """Most rows per step run in a bucket, by width (steady chunks win if finals are no wider)."""
        self._device = next(encoder.parameters()).device
        self._buckets = GraphBuckets("ASR encoder step", self._prepare)
        self._example: tuple[torch.Tensor, ...] | None = None
        """Empty tensors like the first step's inputs: their dtypes and per-row shapes are every bucket's."""
        self.eager_steps = 0
        """Steps that fell back to eager NeMo (more rows than any bucket holds, or no graphs)."""
        self._pool = graph_pool(self._device)

    @property
    def captured(self) -> list[tuple[int, int]]:
        """``(rows, width)`` of the buckets that have a graph (or, on a CPU, fixed buffers)."""
        return self._buckets.captured

    @property
    def batch_limit(self) -> int:
        """Most rows a step replays from a graph; 0 once a capture failed. Only reads: any
        thread may ask."""
        return max(self._limits.values(), default=0)

    def bucket_for(self, rows: int, frames: int) -> tuple[int, int] | None:
        """The bucket a step of ``rows`` rows ``frames`` wide runs in; None: eagerly."""
        width = min((w for w in self._limits if w >= frames), default=None)
        if width is None or rows > self._limits[width]:
            return None
        return bucket_rows(rows), width

    @torch.inference_mode()
    def prepare_all(self) -> None:
        """Capture every bucket now, afresh; if a capture fails, every step runs eagerly
        (logged): slower, but serving. A step must have run: its inputs set the dtypes
        and per-row shapes. Like steps, without autograd: its records would keep each
        capture's activations alive in the graphs' memory pool."""
        if self._example is None:
            raise RuntimeError("run one encoder step before preparing the buckets")
        if not self._limits:
            return  # a capture failed: eager for good
        started, reserved = time.perf_counter(), self._reserved_gib()
        wanted = {(rows, width) for width, limit in self._limits.items() for rows in buckets_up_to(limit)}
        if not self._buckets.prepare(sorted(wanted, reverse=True)):
            self._limits.clear()
            return
        logger.info(
            f"ASR encoder step: {len(self.captured)} buckets ready in {time.perf_counter() - started:.1f} s; "
            f"GPU memory reserved {reserved:.1f} -> {self._reserved_gib():.1f} GiB"
        )

    def _reserved_gib(self) -> float:
        return torch.cuda.memory_reserved(self._device) / 2**30 if self._pool is not None else 0.0

    def __call__(
        self, x: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, frames = x.shape[:2]
        if self._example is None:
            self._example = (x.new_empty(0, 0, x.shape[2]), lengths.new_empty(0), slots.new_empty(0))
        bucket = self._bucket(rows, frames)
        if bucket is None:
            self.eager_steps += 1
            return self._step(x, lengths, slots)
        static_x, static_lengths, static_slots = bucket.inputs
        static_x[:rows, :frames].copy_(x)
        static_x[:rows, frames:].zero_()
        static_lengths[:rows].copy_(lengths)
        static_slots[:rows].copy_(slots)
        static_slots[rows:].fill_(SCRATCH_SLOT)
        encoded, encoded_len = bucket()
        return encoded[:rows].clone(), encoded_len[:rows].clone()

    def _bucket(self, rows: int, frames: int) -> FixedCall | None:
        """The bucket a step runs in, captured now if it is new; None: eagerly (more rows
        than any bucket holds, or graphs off since a capture failed)."""
        key = self.bucket_for(rows, frames)
        if key is None:
            return None
        bucket = self._buckets.find(key)
        if bucket is None:
            self._limits.clear()
        return bucket

    def _prepare(self, key: tuple[int, int]) -> FixedCall:
        """Fixed buffers holding a full chunk for the scratch slot in every row; on a GPU,
        the graph captured over them."""
        rows, width = key
        x, lengths, slots = self._example
        inputs = (
            x.new_zeros(rows, width, x.shape[2]),
            lengths.new_full((rows,), width),
            slots.new_full((rows,), SCRATCH_SLOT),
        )
        bucket = FixedCall(self._step, inputs, self._pool)
        if self._pool is not None:
            logger.debug(f"ASR encoder step captured as a CUDA graph for {rows} rows of {width} frames")
        return bucket
