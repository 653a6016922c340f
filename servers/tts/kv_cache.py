"""Magpie's decoder transformer with a key/value cache per row, for rows at different positions.

NeMo's own cache (``Transformer.reset_cache(use_cache=True)``) is one batch-wide tensor that
grows by concatenation: every row must be at the same position and stay in the batch from
the first step to the last, and it still re-runs the feed-forward over the whole sequence
each step. Our rows join, leave and sit at their own positions, so this module keeps the
keys and values of every layer in a pool of rows (one per sequence, two with CFG) and runs
the decoder's own layers (their weights and norms, NeMo's attention arithmetic) over the new
positions only: a whole prefix when a sequence starts, one position per step after that.
Each position is computed once, with the attention prior of its own step, as NeMo's cached
inference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SCRATCH_ROW = 0
"""Never given out: padding rows of a fixed-size batch write here."""


class KVPool:
    """Keys and values of every decoder layer for a set of rows, grown when it runs out."""

    def __init__(self, decoder, device: torch.device, dtype: torch.dtype):
        self._layers = decoder.layers
        self.device, self._dtype = device, dtype
        self.rows, self.positions, self.text_positions = 0, 0, 0
        self.self_kv: list[torch.Tensor] = []
        """Per layer ``(2, rows, positions, heads, head dim)``: self-attention keys, values."""
        self.cross_kv: list[torch.Tensor | None] = []
        """Per layer ``(2, rows, text positions, heads, head dim)``, None without cross-attention."""
        self._free: list[int] = []
        self.generation = 0
        """Counts reallocations: a CUDA graph over the old tensors is stale after one."""

    def reserve(self, rows: int, positions: int, text_positions: int) -> None:
        """Room for ``rows`` rows at once of up to these lengths, allocated now."""
        needed = rows + 1  # and the scratch row
        if needed > self.rows or positions > self.positions or text_positions > self.text_positions:
            self._grow(
                self.rows if needed <= self.rows else max(needed, 2 * self.rows),
                max(self.positions, positions),
                max(self.text_positions, text_positions),
            )

    def allocate(self, count: int, positions: int, text_positions: int) -> list[int]:
        """Rows for ``count`` sequences of up to ``positions`` decoder and ``text_positions`` text positions."""
        self.reserve(self.rows_in_use + count, positions, text_positions)
        self._free.sort()
        taken, self._free = self._free[:count], self._free[count:]
        return taken

    def release(self, rows: list[int]) -> None:
        self._free.extend(rows)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in [*self.self_kv, *self.cross_kv] if t is not None)

    @property
    def rows_in_use(self) -> int:
        return max(self.rows - 1, 0) - len(self._free)

    def _grow(self, rows: int, positions: int, text_positions: int) -> None:
        def grown(old: torch.Tensor | None, heads: int, head_dim: int, length: int) -> torch.Tensor:
            new = torch.zeros(2, rows, length, heads, head_dim, device=self.device, dtype=self._dtype)
            if old is not None:
                new[:, : old.shape[1], : old.shape[2]] = old
            return new

        self.self_kv = [
            grown(old, layer.self_attention.n_heads, layer.self_attention.d_head, positions)
            for layer, old in zip(self._layers, self.self_kv or [None] * len(self._layers))
        ]
        self.cross_kv = [
            grown(old, layer.cross_attention.n_heads, layer.cross_attention.d_head, text_positions)
            if layer.has_xattn
            else None
            for layer, old in zip(self._layers, self.cross_kv or [None] * len(self._layers))
        ]
        self._free.extend(range(max(self.rows, SCRATCH_ROW + 1), rows))
        self.rows, self.positions, self.text_positions = rows, positions, text_positions
        self.generation += 1


@dataclass
class DecodedPositions:
    hidden: torch.Tensor
    """Decoder output at each row's newest position ``(R, d_model)``."""
    alignment: torch.Tensor | None
    """NeMo's alignment estimate at the newest position ``(R, T_text)``: cross-attention
    averaged over heads and the layers the model names; None if it names none."""


class CachedDecoder:
    """Runs a MagpieTTSModel's decoder over new positions of pooled rows."""

    def __init__(self, model, dtype: torch.dtype):
        decoder, ip = model.decoder, model.inference_parameters
        for layer in decoder.layers:
            if layer.use_moe or layer.pos_ff.proj.kernel_size != 1:
                raise ValueError(
                    "incremental decoding needs a decoder with a pointwise feed-forward "
                    "(kernel_size 1, no mixture of experts), as in the released Magpie checkpoints"
                )
        layers = range(len(decoder.layers))
        self.decoder = decoder
        self.pool = KVPool(decoder, next(model.parameters()).device, dtype)
        self._prior_layers = set(ip.apply_prior_to_layers or layers)
        self._alignment_layers = (
            [i for i in ip.estimate_alignment_from_layers or layers if i in model.transcript_decoder_layers]
            if ip.apply_attention_prior
            else []
        )

    @property
    def estimates_alignment(self) -> bool:
        """Whether steps yield an alignment, from which the attention prior is built: without
        one, no step gets a prior, whatever the checkpoint's ``apply_attention_prior``."""
        return bool(self._alignment_layers)

    def write_text(self, rows: torch.Tensor, text: torch.Tensor) -> None:
        """Store the cross-attention keys and values of ``text`` ``(R, T_text, d)`` for ``rows``."""
        for layer, cross in zip(self.decoder.layers, self.pool.cross_kv):
            if cross is None:
                continue
            attention = layer.cross_attention
            kv = attention.kv_net(layer.norm_xattn_memory(text))
            kv = kv.reshape(len(rows), text.shape[1], 2, attention.n_heads, attention.d_head)
            cross[:, rows, : text.shape[1]] = kv.permute(2, 0, 1, 3, 4).to(cross.dtype)

    def decode(
        self,
        x: torch.Tensor,
        rows: list[int],
        start: list[int],
        last: list[int],
        text_lengths: list[int],
        prior: torch.Tensor | None,
    ) -> DecodedPositions:
        """``forward`` over just the positions and text these rows have (given as lists)."""
        index = torch.tensor([rows, start, last, text_lengths], device=x.device)
        return self.forward(x, *index, prior, span=max(start) + x.shape[1], text_span=max(text_lengths))

    def forward(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        start: torch.Tensor,
        last: torch.Tensor,
        text_lengths: torch.Tensor,
        prior: torch.Tensor | None,
        span: int,
        text_span: int,
    ) -> DecodedPositions:
        """Run ``x`` ``(R, T, d)`` (each row's next T positions, right-padded) through the layers.

        Per row (``(R,)`` tensors): ``start``, the positions already cached; ``last``, the
        index in ``x`` of its newest real position; ``text_lengths``, its text positions.
        ``prior``: an attention prior over the text ``(R, ≥ text_span)`` for the layers the
        model applies it to, or None. Attention reads the first ``span`` cached positions and
        ``text_span`` text positions of each row: fixed values make the call capturable as a
        CUDA graph. Keys and values of the new positions go into the pool (a padded position
        writes past its row's end, where the next real position overwrites it before anyone
        reads it).
        """
        decoder, device = self.decoder, x.device
        positions = start[:, None] + torch.arange(x.shape[1], device=device)  # (R, T)
        if decoder.use_learnable_pos_emb:
            x = x + decoder.position_embeddings(positions)
        visible = torch.arange(span, device=device) <= positions[..., None]  # (R, T, span)
        text_mask = (torch.arange(text_span, device=device) < text_lengths[:, None])[:, None, None]
        newest = torch.arange(len(rows), device=device), last
        alignment = []
        for index, (layer, self_kv, cross_kv) in enumerate(zip(decoder.layers, self.pool.self_kv, self.pool.cross_kv)):
            x = x + self._self_attention(layer.self_attention, layer.norm_self(x), self_kv, rows, positions, visible)
            if cross_kv is not None:
                attended, probabilities = self._cross_attention(
                    layer.cross_attention,
                    layer.norm_xattn_query(x),
                    cross_kv[:, rows, :text_span],
                    text_mask,
                    prior[:, :text_span] if prior is not None and index in self._prior_layers else None,
                )
                x = x + attended
                if index in self._alignment_layers:
                    alignment.append(probabilities[newest[0], :, last].mean(dim=1))
            x = x + layer.pos_ff(layer.norm_pos_ff(x), None)
        return DecodedPositions(decoder.norm_out(x)[newest], torch.stack(alignment).mean(dim=0) if alignment else None)

    @staticmethod
    def _self_attention(attention, x, pool, rows, positions, visible) -> torch.Tensor:
        count, new = x.shape[:2]
        q, k, v = attention.qkv_net(x).reshape(count, new, 3, attention.n_heads, attention.d_head).unbind(2)
        pool[0, rows[:, None], positions] = k.to(pool.dtype)
        pool[1, rows[:, None], positions] = v.to(pool.dtype)
        keys, values = pool[:, rows, : visible.shape[-1]].transpose(2, 3).to(q.dtype)  # (R, heads, span, d)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=visible[:, None], scale=attention.scale
        )
        return attention.o_net(y.transpose(1, 2).reshape(count, new, -1))

    @staticmethod
    def _cross_attention(attention, x, kv, text_mask, prior) -> tuple[torch.Tensor, torch.Tensor]:
        """NeMo's cross-attention arithmetic (softmax, then the prior, renormalised)."""
        count, new = x.shape[:2]
        q = attention.q_net(x).reshape(count, new, attention.n_heads, attention.d_head).transpose(1, 2)
        keys, values = kv.transpose(2, 3).to(q.dtype)  # (R, heads, T_text, d)
        scores = torch.matmul(q, keys.transpose(2, 3)) * attention.scale
        scores = scores.masked_fill(~text_mask, float("-inf"))
        probabilities = F.softmax(scores, dim=-1)
        if prior is not None:
            prior = prior[:, None, None] + torch.finfo(prior.dtype).tiny
            probabilities = probabilities * prior
            probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
        probabilities = probabilities.masked_fill(~text_mask, 0.0)
        y = torch.matmul(probabilities, values).transpose(1, 2).reshape(count, new, -1)
        return attention.o_net(y), probabilities
