"""One batched cache-aware streaming step over rows from many sessions.

Each row is one session's next piece of audio features. The step computes the features
of all rows in one preprocessor call, subsamples first chunks (no pre-encode cache, as in
NeMo's exact streaming schedule) and later chunks (with cache) separately, then runs all
rows through one call of the conformer layers (replayed from a CUDA graph on a GPU) and
one batched greedy RNNT decode. Each session's encoder caches, decoder state and
pre-encode feature cache live in a slot of a ``StatePool`` and are gathered and
scattered by index (the encoder's caches by the conformer call itself, inside its CUDA
graph).

Rows of different kinds can share the conformer call because a first chunk and a later
chunk both subsample to the same number of encoder frames. A final row may be shorter
(its right padding is masked). One longer than a chunk (the finalize padding after the
last audio) gets a conformer call of its own in the same step, with the step's other
long finals: padding a continuing row would corrupt its cache, and a final row's state
is discarded. So a final takes one step whatever else runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from loguru import logger

from servers.asr.encoder_graphs import ENCODER_CACHES, GraphedEncoderStep, encoder_step
from servers.asr.features import FeatureBatch, FeatureRequest, compute_features
from servers.asr.model import StreamingGeometry
from servers.asr.state_pool import PooledTensor, StatePool
from servers.common.precision import autocast, store_weights_for_autocast


@dataclass(frozen=True)
class StepRow:
    slot: int
    request: FeatureRequest
    first: bool
    """The utterance's first chunk: subsampled without pre-encode cache."""
    final: bool
    """The utterance's last chunk: its state is not kept."""


@dataclass(frozen=True)
class _Group:
    """Rows of one kind (first chunk or not) that want equally many new feature frames:
    a step handles each group with a few tensor ops, not a few per row."""

    index: torch.Tensor
    """The group's rows in the step."""
    first: bool
    frames: torch.Tensor
    """New feature frames ``[rows, n_mels, count]``."""
    cache: torch.Tensor
    """The rows' pre-encode feature caches before this step ``[rows, n_mels, cache frames]``."""


@dataclass(frozen=True)
class StepOutput:
    tokens: list[list[int]]
    """New token ids per row, in row order."""
    encoded: torch.Tensor
    """Encoder output ``[rows, d_model, frames]``; row ``i`` is valid up to ``encoded_len[i]``."""
    encoded_len: torch.Tensor


class BatchedStreamingStep:
    """The model, its streaming geometry, and the slot pool of per-session state."""

    def __init__(
        self,
        model,
        geometry: StreamingGeometry,
        *,
        max_sessions: int,
        initial_slots: int = 16,
        autocast_dtype: torch.dtype | None = None,
        graph_max_batch: int = 0,
    ):
        """``graph_max_batch`` > 0 runs steps of up to that many rows from CUDA graphs
        (``encoder_graphs``); 0 runs every step eagerly. Under bf16 autocast the encoder's
        layers keep their weights in bf16 (``store_weights_for_autocast``): the model must
        not run its encoder outside that autocast afterwards."""
        from nemo.collections.asr.parts.submodules.transducer_decoding.label_looping_base import (
            BatchedLabelLoopingState,
        )

        self._state_type = BatchedLabelLoopingState
        self.model = model
        self.geometry = geometry
        self.device = next(model.parameters()).device
        self._autocast_dtype = autocast_dtype
        if freed := store_weights_for_autocast(model.encoder, autocast_dtype):
            logger.info(f"ASR encoder weights stored in {autocast_dtype}: {freed / 2**30:.2f} GiB freed")
        self._decoder = model.decoding.decoding.decoding_computer
        self._max_rows = max_sessions
        self._final_out_frames = self._longest_final_out_frames()
        """Encoder frames of the widest final row (for the encoder graphs and the decoder's warm-up)."""
        graph_max_batch = min(graph_max_batch, max_sessions)
        # CUDA graphs hold the pool's addresses: it is made at its full size for them.
        layout = self._state_layout()
        self.pool = StatePool(layout, max_sessions if graph_max_batch > 0 else initial_slots, max_sessions)
        if self.pool.fixed:
            logger.info(f"ASR state for {max_sessions} sessions: {self.pool.nbytes / 2**30:.2f} GiB")
        self._carried = [name for name in layout if name not in ENCODER_CACHES]
        """State the step gathers and scatters itself (the encoder step moves its own caches)."""
        self.encoder_graphs = (
            GraphedEncoderStep(
                model.encoder,
                self.pool,
                out_frames=geometry.out_frames,
                final_out_frames=self._final_out_frames,
                autocast_dtype=autocast_dtype,
                max_batch=graph_max_batch,
            )
            if graph_max_batch > 0
            else None
        )
        self._encoder_step = self.encoder_graphs or functools.partial(
            encoder_step, model.encoder, autocast_dtype, self.pool
        )

    @torch.inference_mode()
    def prepare_decoder(self) -> None:
        """NeMo's CUDA-graph decoder captures its graphs again for any batch larger (or
        longer) than it has seen, stalling every stream when that first happens while
        serving: show it the largest step there can be now."""
        if self.model.decoding.decoding.decoding_computer.cuda_graphs_mode is None:
            return
        rows, frames = self._max_rows, max(self.geometry.out_frames, self._final_out_frames)
        x = torch.zeros(rows, frames, self.model.encoder.d_model, device=self.device)
        self._decoder(x=x, out_len=torch.full((rows,), frames, device=self.device), prev_batched_state=None)

    @torch.inference_mode()
    def _longest_final_out_frames(self) -> int:
        """Encoder frames of the widest final row, first chunk or not."""
        g = self.geometry
        index = torch.zeros(1, dtype=torch.int64, device=self.device)
        cache = torch.zeros(1, g.n_mels, g.pre_encode_cache_frames, device=self.device)
        frames = torch.zeros(1, g.n_mels, g.max_final_frames, device=self.device)
        return max(self._pre_encode(_Group(index, first, frames, cache))[0].shape[1] for first in (True, False))

    @torch.no_grad()  # plain tensors (updated outside inference mode too) with no autograd history
    def _state_layout(self) -> dict[str, PooledTensor]:
        g = self.geometry
        channel, time_, channel_len = self.model.encoder.get_initial_cache_state(batch_size=1, device=self.device)
        # The conformer only reads its caches through autocast's casts: keeping them in
        # that dtype halves their memory and traffic and changes no result.
        cache_dtype = self._autocast_dtype or channel.dtype
        channel, time_ = channel.to(cache_dtype), time_.to(cache_dtype)
        # The decoder's state after the start symbol, as NeMo's label-looping decoder
        # starts every hypothesis; carried between steps as tensors, never as Hypothesis.
        after_sos = self._decoder._get_batched_decoding_state_after_sos(device=self.device, batch_size=1)
        layout = {
            "cache_last_channel": PooledTensor(channel, 1),
            "cache_last_time": PooledTensor(time_, 1),
            "cache_last_channel_len": PooledTensor(channel_len, 0),
            "feature_cache": PooledTensor(torch.zeros(1, g.n_mels, g.pre_encode_cache_frames, device=self.device), 0),
            "predictor_outputs": PooledTensor(after_sos.predictor_outputs, 0),
            "labels": PooledTensor(after_sos.labels, 0),
            "decoded_lengths": PooledTensor(after_sos.decoded_lengths, 0),
        }
        self._n_predictor_states = len(after_sos.predictor_states)
        for i, state in enumerate(after_sos.predictor_states):
            layout[f"predictor_state_{i}"] = PooledTensor(state, 1)
        return layout

    def _wide(self, row: StepRow) -> bool:
        """A final row with more new frames than a chunk of its kind: it may subsample to
        more encoder frames than a steady row, so the conformer runs it in a call of its own."""
        g = self.geometry
        return row.final and row.request.count > (g.first_chunk_frames if row.first else g.chunk_frames)

    @torch.inference_mode()
    def run(self, rows: list[StepRow]) -> StepOutput:
        wide = [self._wide(r) for r in rows]
        order = sorted(range(len(rows)), key=wide.__getitem__)
        out = self._run_narrow_first([rows[i] for i in order], wide.count(False))
        if order == list(range(len(rows))):
            return out
        position = [0] * len(rows)
        for at, i in enumerate(order):
            position[i] = at
        index = torch.tensor(position, device=self.device)
        return StepOutput(
            tokens=[out.tokens[at] for at in position],
            encoded=out.encoded.index_select(0, index),
            encoded_len=out.encoded_len.index_select(0, index),
        )

    def _run_narrow_first(self, rows: list[StepRow], narrow: int) -> StepOutput:
        """``run`` over rows whose first ``narrow`` are at most a steady chunk wide."""
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        state = self.pool.gather(slots, self._carried)
        features = compute_features(self.model.preprocessor, [r.request for r in rows], self.device)
        groups = self._group(rows, features, state["feature_cache"])
        x, lengths = self._pre_encode_all(groups, len(rows))
        encoded, encoded_len = self._encode(x, lengths, slots, narrow)
        previous = self._state_type(
            predictor_states=tuple(state[f"predictor_state_{i}"] for i in range(self._n_predictor_states)),
            predictor_outputs=state["predictor_outputs"],
            labels=state["labels"],
            decoded_lengths=state["decoded_lengths"],
        )
        encoded = encoded.float()
        hyps, decoded = self._decoder(x=encoded.transpose(1, 2), out_len=encoded_len, prev_batched_state=previous)
        # NeMo's CUDA-graph decoder answers for the largest batch it has seen so far: only
        # the first len(rows) rows of what it returns are this step's.
        batch = len(rows)
        keep = [i for i, r in enumerate(rows) if not r.final]
        if keep:
            decoder_state = {
                "predictor_outputs": decoded.predictor_outputs,
                "labels": decoded.labels,
                "decoded_lengths": decoded.decoded_lengths,
                **{f"predictor_state_{i}": s for i, s in enumerate(decoded.predictor_states)},
            }
            new_state = {
                "feature_cache": self._next_feature_cache(groups, state["feature_cache"]),
                **{name: value.narrow(self.pool.batch_dim(name), 0, batch) for name, value in decoder_state.items()},
            }
            if len(keep) == batch:
                self.pool.scatter(slots, new_state)
            else:
                index = torch.tensor(keep, device=self.device)
                self.pool.scatter(slots[index], new_state, rows=index)
        counts = hyps.current_lengths[:batch].tolist()
        transcript = hyps.transcript[:batch, : max(counts, default=0)].tolist()
        tokens = [row[:count] for row, count in zip(transcript, counts)]
        return StepOutput(tokens=tokens, encoded=encoded, encoded_len=encoded_len)

    def _encode(self, x: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor, narrow: int):
        """The conformer over all rows: one call for the first ``narrow`` rows, cut to a
        steady chunk's width (padding a continuing row would corrupt its cache), one for the
        wide final rows after them (their next caches are written too, and discarded when
        their utterance ends)."""
        if narrow in (0, x.shape[0]):
            return self._encoder_step(x, lengths, slots)
        first = self._encoder_step(x[:narrow, : self.geometry.out_frames], lengths[:narrow], slots[:narrow])
        last = self._encoder_step(x[narrow:], lengths[narrow:], slots[narrow:])
        encoded = last[0].new_zeros(x.shape[0], *last[0].shape[1:])
        encoded[:narrow, :, : first[0].shape[2]] = first[0]
        encoded[narrow:] = last[0]
        return encoded, torch.cat([first[1], last[1]])

    def _group(self, rows: list[StepRow], features: FeatureBatch, feature_cache: torch.Tensor) -> list[_Group]:
        kinds: dict[tuple[bool, int], list[int]] = {}
        for i, r in enumerate(rows):
            kinds.setdefault((r.first, r.request.count), []).append(i)
        groups = []
        for (first, _count), members in kinds.items():
            index = torch.tensor(members, device=self.device)
            groups.append(_Group(index, first, features.frames(members, index), feature_cache.index_select(0, index)))
        return groups

    def _pre_encode_all(self, groups: list[_Group], batch: int):
        """Subsample each group (first chunks without cache, later chunks with it); one
        padded batch of all."""
        parts = [(g.index, *self._pre_encode(g)) for g in groups]
        width = max(x.shape[1] for _, x, _ in parts)
        x_all = parts[0][1].new_zeros(batch, width, parts[0][1].shape[2])
        n_all = torch.zeros(batch, dtype=torch.int64, device=self.device)
        for index, x, n in parts:
            x_all[index, : x.shape[1]] = x
            n_all[index] = n
        return x_all, n_all

    def _pre_encode(self, group: _Group):
        features = group.frames if group.first else torch.cat([group.cache, group.frames], dim=2)
        n = torch.full((features.shape[0],), features.shape[2], device=self.device)
        with autocast(self.device.type, self._autocast_dtype):
            x, n = self.model.encoder.pre_encode(x=features.transpose(1, 2), lengths=n)
        n = n.to(torch.int64)
        if not group.first:
            drop = self.geometry.drop_extra_pre_encoded
            x, n = x[:, drop:], (n - drop).clamp(min=0)
        return x, n

    def _next_feature_cache(self, groups: list[_Group], feature_cache: torch.Tensor) -> torch.Tensor:
        """Each row's last ``pre_encode_cache_frames`` feature frames, old cache included."""
        keep = self.geometry.pre_encode_cache_frames
        result = torch.empty_like(feature_cache)
        for g in groups:
            result[g.index] = torch.cat([g.cache, g.frames], dim=2)[:, :, -keep:]
        return result
