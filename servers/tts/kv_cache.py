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


class KVPool:
    """Keys and values of every decoder layer for a set of rows, grown when it runs out."""

    def __init__(self, decoder, device: torch.device, dtype: torch.dtype):
        self._layers = decoder.layers
        self._device, self._dtype = device, dtype
        self.rows, self.positions, self.text_positions = 0, 0, 0
        self.self_kv: list[torch.Tensor] = []
        """Per layer ``(2, rows, positions, heads, head dim)``: self-attention keys, values."""
        self.cross_kv: list[torch.Tensor | None] = []
        """Per layer ``(2, rows, text positions, heads, head dim)``, None without cross-attention."""
        self._free: list[int] = []

    def allocate(self, count: int, positions: int, text_positions: int) -> list[int]:
        """Rows for ``count`` sequences of up to ``positions`` decoder and ``text_positions`` text positions."""
        needed = self.rows_in_use + count
        if needed > self.rows or positions > self.positions or text_positions > self.text_positions:
            self._grow(
                self.rows if needed <= self.rows else max(needed, 2 * self.rows),
                max(self.positions, positions),
                max(self.text_positions, text_positions),
            )
        self._free.sort()
        taken, self._free = self._free[:count], self._free[count:]
        return taken

    def release(self, rows: list[int]) -> None:
        self._free.extend(rows)

    @property
    def rows_in_use(self) -> int:
        return self.rows - len(self._free)

    def _grow(self, rows: int, positions: int, text_positions: int) -> None:
        def grown(old: torch.Tensor | None, heads: int, head_dim: int, length: int) -> torch.Tensor:
            new = torch.zeros(2, rows, length, heads, head_dim, device=self._device, dtype=self._dtype)
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
        self._free.extend(range(self.rows, rows))
        self.rows, self.positions, self.text_positions = rows, positions, text_positions


@dataclass
class DecodedPositions:
    hidden: torch.Tensor
    """Decoder output at each row's newest position ``(R, d_model)``."""
    cross_probabilities: list[torch.Tensor | None]
    """Per layer, cross-attention probabilities at the newest position ``(R, heads, T_text)``."""


class CachedDecoder:
    """Runs a MagpieTTSModel's decoder over new positions of pooled rows."""

    def __init__(self, model, dtype: torch.dtype):
        decoder = model.decoder
        for layer in decoder.layers:
            if layer.use_moe or layer.pos_ff.proj.kernel_size != 1:
                raise ValueError(
                    "incremental decoding needs a decoder with a pointwise feed-forward "
                    "(kernel_size 1, no mixture of experts), as in the released Magpie checkpoints"
                )
        self.decoder = decoder
        self.pool = KVPool(decoder, next(model.parameters()).device, dtype)

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
        prior: list[torch.Tensor | None],
    ) -> DecodedPositions:
        """Run ``x`` ``(R, T, d)`` (each row's next T positions, right-padded) through the layers.

        Per row: ``start``, the positions already cached; ``last``, the index in ``x`` of its
        newest real position; ``text_lengths``, its text positions. ``prior``: per layer an
        attention prior over the text ``(R, T_text)`` or None. Keys and values of the new
        positions go into the pool (a padded position writes past its row's end, where the
        next real position overwrites it before anyone reads it).
        """
        decoder, device = self.decoder, x.device
        new = x.shape[1]
        span, text_span = max(start) + new, max(text_lengths)
        index = torch.tensor([rows, start, last, text_lengths], device=device)
        rows_t, start_t, last_t, text_t = index
        positions = start_t[:, None] + torch.arange(new, device=device)  # (R, T)
        if decoder.use_learnable_pos_emb:
            x = x + decoder.position_embeddings(positions)
        visible = torch.arange(span, device=device) <= positions[..., None]  # (R, T, span)
        text_mask = (torch.arange(text_span, device=device) < text_t[:, None])[:, None, None]
        newest = torch.arange(len(rows), device=device), last_t
        cross_probabilities: list[torch.Tensor | None] = []
        for layer, self_kv, cross_kv, layer_prior in zip(decoder.layers, self.pool.self_kv, self.pool.cross_kv, prior):
            x = x + self._self_attention(layer.self_attention, layer.norm_self(x), self_kv, rows_t, positions, visible)
            probabilities = None
            if cross_kv is not None:
                attended, probabilities = self._cross_attention(
                    layer.cross_attention,
                    layer.norm_xattn_query(x),
                    cross_kv[:, rows_t, :text_span],
                    text_mask,
                    layer_prior,
                )
                x = x + attended
                probabilities = probabilities[newest[0], :, last_t]
            cross_probabilities.append(probabilities)
            x = x + layer.pos_ff(layer.norm_pos_ff(x), None)
        return DecodedPositions(decoder.norm_out(x)[newest], cross_probabilities)

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
            prior = prior[:, None, None, : scores.shape[-1]] + torch.finfo(prior.dtype).tiny
            probabilities = probabilities * prior
            probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
        probabilities = probabilities.masked_fill(~text_mask, 0.0)
        y = torch.matmul(probabilities, values).transpose(1, 2).reshape(count, new, -1)
        return attention.o_net(y), probabilities
