"""The decoder step of sequences already in the cache: one new position each, eager or
replayed from CUDA graphs.

After a sequence's prefix is cached, each step feeds the decoder one position per row (the
frame stack sampled last step) against a fixed-size key/value pool, so the whole step from
codes to hidden state and alignment can be one CUDA graph per power-of-two batch: the
eager step launches a dozen kernels per layer for every step of every turn.
"""

from __future__ import annotations

import torch
from loguru import logger

from servers.common.cuda_graphs import FixedCall, GraphBuckets, bucket_rows, buckets_up_to, graph_pool
from servers.common.precision import autocast
from servers.tts.kv_cache import SCRATCH_ROW, CachedDecoder


def embed_frame_stack(model, codes: torch.Tensor) -> torch.Tensor:
    """One decoder input per row ``(B, E)`` from its frame stack ``(B, codebooks, frames)``:
    NeMo's ``embed_audio_tokens`` for a single stack, without its length masks (which read
    the lengths on the host, a sync no graph can hold)."""
    codebooks, frames = codes.shape[1:]
    tables = model.audio_embeddings
    total = sum(tables[c + i * codebooks](codes[:, c, i]) for i in range(frames) for c in range(codebooks))
    return total / (codebooks * frames)


class AdvanceStep:
    """``codes`` ``(B, codebooks, frames)`` of each sequence's newest stack → decoder hidden
    state ``(branches·B, d)`` (conditional rows first) and alignment ``(B, T_text)``."""

    def __init__(self, model, transformer: CachedDecoder, branches: int, autocast_dtype: torch.dtype | None):
        self._model = model
        self._transformer = transformer
        self._branches = branches
        self._autocast_dtype = autocast_dtype

    def __call__(self, codes, rows, start, text_lengths, prior, span: int, text_span: int):
        with autocast(codes.device.type, self._autocast_dtype):
            x = embed_frame_stack(self._model, codes)[:, None].repeat(self._branches, 1, 1)
            decoded = self._transformer.forward(
                x, rows, start, torch.zeros_like(rows), text_lengths, prior, span=span, text_span=text_span
            )
        alignment = decoded.alignment[: len(codes)] if decoded.alignment is not None else None
        return decoded.hidden, alignment


class PoolGraphs:
    """A call over the whole key/value pool, replayed from one CUDA graph per power-of-two
    batch up to ``max_batch``, all captured by ``prepare_all`` once the pool has its final
    size. Rows beyond the batch write to the pool's scratch row. If the pool grows after
    the capture (longer text than it was reserved for), the graphs are dropped: eager.
    Subclasses name their work (``what``), say what a bucket's inputs are (``_prepare``)
    and fill them."""

    what: str

    INDEX_PADDING = (SCRATCH_ROW, 0, 1)
    """A bucket index's value for the rows beyond a batch, per column: the scratch row, no
    position, one text position (finite attention)."""

    def __init__(self, transformer: CachedDecoder, branches: int, max_batch: int):
        self._pool = transformer.pool
        self._branches = branches
        self.max_batch = max_batch
        self._graph_pool = graph_pool(self._pool.device)
        self._buckets = GraphBuckets(self.what, self._bucket)
        self._generation = self._pool.generation
        """The pool's generation the buckets were captured over."""

    @property
    def captured(self) -> list[int]:
        return self._buckets.captured

    @property
    def batch_limit(self) -> int:
        """Largest batch replayed from the graphs; 0 once a capture failed or the pool grew
        after them (its tensors moved), for the rest of the process. Only reads: any
        thread may ask."""
        return 0 if self._pool_moved() else self.max_batch

    def covers(self, batch: int) -> bool:
        """Whether a step of ``batch`` rows replays a graph (on the stepping thread: graphs
        over a pool that has grown since are dropped here)."""
        if self._pool_moved():
            logger.warning(f"TTS key/value pool grew after the {self.what} graphs were captured; it runs eagerly")
            self._buckets.clear()
            self.max_batch = 0
        return batch <= self.max_batch

    def _pool_moved(self) -> bool:
        return bool(self._buckets) and self._pool.generation != self._generation

    def prepare_all(self) -> None:
        """Capture every bucket over the pool as it is now (any made on first use may be over
        a pool that has grown since); if a capture fails, run eagerly."""
        if not self._buckets.prepare(buckets_up_to(self.max_batch)):
            self.max_batch = 0

    def _bucket(self, size: int) -> FixedCall:
        if not self._buckets:
            self._generation = self._pool.generation
        return self._prepare(size)

    def _prepare(self, size: int) -> FixedCall:
        raise NotImplementedError

    def _index_input(self, size: int) -> torch.Tensor:
        """A bucket's per-row index ``(3, branches·size)``, every row padding."""
        padding = torch.tensor(self.INDEX_PADDING, device=self._pool.device)
        return padding[:, None].repeat(1, size * self._branches)

    def _fill_index(self, index: torch.Tensor, columns: tuple[list[int], list[int], list[int]], batch: int) -> None:
        """Write per-row lists (conditional rows first, ``batch`` per branch) into a bucket's
        index, each branch's rows padded with ``INDEX_PADDING``, in one copy."""
        padding = index.shape[1] // self._branches - batch
        lists = [
            [
                value
                for b in range(self._branches)
                for value in [*column[b * batch : (b + 1) * batch], *[fill] * padding]
            ]
            for column, fill in zip(columns, self.INDEX_PADDING)
        ]
        index.copy_(torch.tensor(lists), non_blocking=True)

    def _batch_rows(self, output: torch.Tensor, batch: int, size: int) -> torch.Tensor:
        """The real rows of a bucket's output, conditional first (a copy: the next replay
        writes the output again)."""
        return torch.cat([output[b * size : b * size + batch] for b in range(self._branches)])


class GraphedAdvance(PoolGraphs):
    """``AdvanceStep`` over the whole pool from CUDA graphs (see ``PoolGraphs``)."""

    what = "TTS decoder step"

    def __init__(self, step: AdvanceStep, transformer: CachedDecoder, model, branches: int, max_batch: int):
        super().__init__(transformer, branches, max_batch)
        self._step = step
        self._codes_shape = (model.num_audio_codebooks, model.frame_stacking_factor)
        self._with_prior = transformer.estimates_alignment

    def __call__(self, codes, rows: list[int], start: list[int], text_lengths: list[int], prior):
        """As ``AdvanceStep`` for ``batch = len(codes)`` ≤ ``max_batch`` sequences; the
        per-row lists and ``prior`` ``(branches·batch, T_text)`` in conditional-first order."""
        batch = len(codes)
        size = bucket_rows(batch)
        bucket = self._buckets.get(size)
        static_codes, static_index, *static_prior = bucket.inputs
        static_codes[:batch].copy_(codes)
        self._fill_index(static_index, (rows, start, text_lengths), batch)
        if static_prior:
            for b in range(self._branches):
                static_prior[0][b * size : b * size + batch, : prior.shape[1]] = prior[b * batch : (b + 1) * batch]
        hidden, alignment = bucket()
        return self._batch_rows(hidden, batch, size), alignment[:batch] if alignment is not None else None

    def _prepare(self, size: int) -> FixedCall:
        rows, device = size * self._branches, self._pool.device
        inputs = [torch.zeros(size, *self._codes_shape, dtype=torch.long, device=device), self._index_input(size)]
        if self._with_prior:
            inputs.append(torch.ones(rows, self._pool.text_positions, device=device))
        span, text_span = self._pool.positions, self._pool.text_positions

        def replayed(codes, index, prior=None):
            return self._step(codes, *index, prior, span=span, text_span=text_span)

        return FixedCall(replayed, tuple(inputs), self._graph_pool)


class GraphedPrefill(PoolGraphs):
    """New sequences' prefixes (their voice's context, then the BOS frames) into the cache
    from CUDA graphs (see ``PoolGraphs``): a sequence's first step ran the whole decoder
    eagerly over its ~200 prefix positions, a thousand kernel launches before its first
    audio. Every bucket is ``width`` positions wide (the longest voice's prefix); a row's
    padding writes past its end, where its next steps overwrite it before anyone reads it."""

    what = "TTS prefill"

    def __init__(
        self,
        transformer: CachedDecoder,
        width: int,
        d_model: int,
        autocast_dtype: torch.dtype | None,
        branches: int,
        max_batch: int,
    ):
        super().__init__(transformer, branches, max_batch)
        self._transformer = transformer
        self._width = width
        self._d_model = d_model
        self._autocast_dtype = autocast_dtype

    def __call__(self, prefixes: torch.Tensor, rows: list[int], last: list[int], text_lengths: list[int]):
        """Hidden state at each row's last prefix position ``(branches·batch, d)`` and the
        conditional rows' alignment, for ``prefixes`` ``(branches·batch, T, d)``
        right-padded, conditional rows first, with per-row lists in the same order."""
        batch = len(rows) // self._branches
        size = bucket_rows(batch)
        bucket = self._buckets.get(size)
        static_x, static_index = bucket.inputs
        for b in range(self._branches):
            static_x[b * size : b * size + batch, : prefixes.shape[1]] = prefixes[b * batch : (b + 1) * batch]
        self._fill_index(static_index, (rows, last, text_lengths), batch)
        hidden, alignment = bucket()
        return self._batch_rows(hidden, batch, size), alignment[:batch] if alignment is not None else None

    def _prepare(self, size: int) -> FixedCall:
        device = self._pool.device
        x = torch.zeros(size * self._branches, self._width, self._d_model, device=device)
        return FixedCall(self._prefill, (x, self._index_input(size)), self._graph_pool)

    def _prefill(self, x: torch.Tensor, index: torch.Tensor):
        rows, last, text_lengths = index
        with autocast(x.device.type, self._autocast_dtype):
            decoded = self._transformer.forward(
                x, rows, torch.zeros_like(rows), last, text_lengths, None, self._width, self._pool.text_positions
            )
        return decoded.hidden, decoded.alignment


class GraphedText(PoolGraphs):
    """New sequences' text through the text encoder and into their rows' cross-attention
    keys and values, from CUDA graphs (see ``PoolGraphs``): eagerly that is ~900 kernel
    launches before a segment's first step, on the way to its first audio. Every bucket is
    the pool's text width; positions past a text's length are masked in the encoder and
    never attended by the decoder."""

    what = "TTS text encoder"

    def __init__(
        self, model, transformer: CachedDecoder, autocast_dtype: torch.dtype | None, branches: int, max_batch: int
    ):
        super().__init__(transformer, branches, max_batch)
        self._model = model
        self._transformer = transformer
        self._autocast_dtype = autocast_dtype

    def __call__(self, text: torch.Tensor, lengths: list[int], rows: list[int]) -> None:
        """Encode ``text`` ``(count, T)`` (right-padded, ``lengths`` its tokens) into
        ``rows`` (``branches·count``, conditional rows first)."""
        count = len(lengths)
        size = bucket_rows(count)
        bucket = self._buckets.get(size)
        static_text, static_index = bucket.inputs
        static_text[:count, : text.shape[1]] = text
        self._fill_index(static_index, (rows, [0] * len(rows), lengths + [1] * (len(rows) - count)), count)
        bucket()

    def _prepare(self, size: int) -> FixedCall:
        text = torch.zeros(size, self._pool.text_positions, dtype=torch.long, device=self._pool.device)
        return FixedCall(self._encode, (text, self._index_input(size)), self._graph_pool)

    def _encode(self, text: torch.Tensor, index: torch.Tensor) -> None:
        rows, _, lengths = index
        size = len(text)
        with autocast(text.device.type, self._autocast_dtype):
            write_text(self._model, self._transformer, text, lengths[:size], rows, self._branches)


def write_text(
    model, transformer: CachedDecoder, text: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor, branches: int
) -> None:
    """Encode ``text`` ``(count, T)`` as NeMo's ``_encode_text_input`` does, with its mask
    made from the fixed width (NeMo's reads the longest length on the host), and store it
    for the conditional ``rows``; the unconditional rows get NeMo's dummy text, one zero vector."""
    count = len(text)
    mask = torch.arange(text.shape[1], device=text.device) < lengths[:, None]
    encoded = model.encoder(model.embed_text(text, mask), mask, cond=None, cond_mask=None)["output"]
    transformer.write_text(rows[:count], encoded)
    if branches == 2:
        transformer.write_text(rows[count:], torch.zeros_like(encoded[:, :1]))
