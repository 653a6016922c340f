"""A decoder step's codes from Magpie's local transformer, in a form a CUDA graph can hold.

After each decoder step, NeMo's ``LocalTransformerHelper.sample_autoregressive`` picks the
step's codes one codebook (and stacked frame) at a time: 16 sequential passes of a small
transformer, ~40 ms of kernel launches per decoder step on an H100 whatever the batch.
A CUDA graph would launch them at once, but NeMo's loop cannot be captured: it marks rows
through Python dicts, writes through boolean masks and Python index lists (host syncs and
host copies), and ``torch.multinomial`` checks its input on the host. ``sample_codes`` is
the same computation with row masks, ``masked_fill`` and a device table of forbidden
tokens, drawing like ``torch.multinomial`` does for one sample (the exponential race), so
the same random numbers give the same codes. ``GraphedSampler`` replays it per batch size.
"""

from __future__ import annotations

import functools

import torch

from servers.common.cuda_graphs import FixedCall, GraphBuckets, bucket_rows, buckets_up_to, graph_pool
from servers.common.precision import autocast


class CodeSampler:
    """Sampling settings and token tables of one model, read once."""

    def __init__(self, model, autocast_dtype: torch.dtype | None = None):
        from nemo.collections.tts.modules.magpietts_modules import SpecialAudioToken

        ip = model.inference_parameters
        self.helper = model._lt_helper
        self.temperature, self.topk = ip.temperature, ip.topk
        self.cfg_scale = ip.cfg_scale
        self.use_kv_cache = ip.use_LT_kv_cache
        self.heads = model.num_audio_codebooks * model.frame_stacking_factor
        self.frames_per_step, self.codebooks = model.frame_stacking_factor, model.num_audio_codebooks
        self.autocast_dtype = autocast_dtype
        device = next(model.parameters()).device
        tokens = model.num_all_tokens_per_codebook
        self.forbidden = torch.zeros(tokens, dtype=torch.bool, device=device)
        self.forbidden[SpecialAudioToken.get_forbidden_tokens(model.codebook_size)] = True
        self.eos = torch.zeros(tokens, dtype=torch.bool, device=device)
        self.eos[model.audio_eos_id] = True
        self.forced_logits = torch.full((tokens,), float("-inf"), device=device).masked_fill(self.eos, 0.0)
        """A row whose speech must end: only EOS is possible."""

    def row_masks(self, eos_forbidden: torch.Tensor, eos_forced: torch.Tensor, dims: int):
        """Row masks ``(rows,)`` shaped for logits of ``dims`` dimensions (rows first,
        tokens last): where EOS is impossible, and the rows that can only end."""
        shape = (-1,) + (1,) * (dims - 1)
        return eos_forbidden.view(shape) & self.eos, eos_forced.view(shape)

    def restrict(self, logits: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``logits`` with what a row may not say made impossible: EOS where forbidden,
        all but EOS where forced (forced wins), and the special tokens no row may say."""
        no_eos, forced = masks
        logits = logits.masked_fill(no_eos, float("-inf"))
        logits = torch.where(forced, self.forced_logits, logits)
        return logits.masked_fill(self.forbidden, float("-inf"))


def sample_codes(
    sampler: CodeSampler, dec_output: torch.Tensor, eos_forbidden: torch.Tensor, eos_forced: torch.Tensor
) -> torch.Tensor:
    """Codes ``(B, codebooks, frames per step)`` for decoder outputs ``(B, E)``, or
    ``(2B, E)`` with classifier-free guidance (conditional rows first); ``eos_forbidden``
    and ``eos_forced`` are ``(B,)`` row masks."""
    s, lt = sampler, sampler.helper
    cfg = dec_output.shape[0] != eos_forbidden.shape[0]
    batch = eos_forbidden.shape[0]
    if cfg:  # guidance rows are sampled too (as in NeMo: same random numbers), then overwritten
        eos_forbidden = torch.cat([eos_forbidden, torch.zeros_like(eos_forbidden)])
        eos_forced = torch.cat([eos_forced, torch.zeros_like(eos_forced)])
    masks = s.row_masks(eos_forbidden, eos_forced, dims=2)
    with autocast(dec_output.device.type, s.autocast_dtype):
        lt.local_transformer.reset_cache(use_cache=s.use_kv_cache)
        sequence = lt.local_transformer_in_projection(dec_output.unsqueeze(1))
        picks = []
        for head in range(s.heads):
            mask = torch.ones(sequence.shape[:2], device=sequence.device)
            newest = lt.local_transformer(sequence, mask)["output"][:, -1, :]
            logits = lt.local_transformer_out_projections[head](lt.local_transformer_audio_out_projection(newest))
            if cfg:
                guided = s.cfg_scale * logits[:batch] + (1.0 - s.cfg_scale) * logits[batch:]
                logits = torch.cat([guided, logits[batch:]])
            logits = s.restrict(logits, masks)
            kth_best = torch.topk(logits, s.topk, dim=-1)[0][:, -1:]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
            if s.temperature <= 0.0:
                pick = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / s.temperature, dim=-1)
                pick = (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1, keepdim=True)
            if cfg:
                pick = torch.cat([pick[:batch], pick[:batch]])
            picks.append(pick)
            following = lt.audio_embeddings[head](pick.squeeze(-1)).unsqueeze(1)
            following = lt.local_transformer_in_projection(lt.audio_in_projection(following))
            sequence = torch.cat([sequence, following], dim=1)
    codes = torch.cat(picks, dim=1).reshape(-1, s.frames_per_step, s.codebooks).permute(0, 2, 1)
    return codes[:batch]


class GraphedSampler:
    """``sample_codes`` replayed from CUDA graphs, one per power-of-two batch up to
    ``max_batch``, all captured by ``prepare_all`` (before serving). Rows beyond the batch
    hold stale finite values; local-transformer rows never mix. Larger batches run eagerly.
    """

    def __init__(self, sampler: CodeSampler, embedding: int, use_cfg: bool, max_batch: int):
        self._sampler = sampler
        self._embedding = embedding
        self._use_cfg = use_cfg
        self.max_batch = max_batch
        self._device = sampler.forbidden.device
        self._pool = graph_pool(self._device)
        self._buckets = GraphBuckets("TTS code sampler", self._prepare)

    @property
    def captured(self) -> list[int]:
        return self._buckets.captured

    def prepare_all(self) -> None:
        """Capture every bucket; if a capture fails, sample eagerly instead."""
        if not self._buckets.prepare(buckets_up_to(self.max_batch)):
            self.max_batch = 0

    def __call__(self, dec_output: torch.Tensor, eos_forbidden: torch.Tensor, eos_forced: torch.Tensor) -> torch.Tensor:
        batch = eos_forbidden.shape[0]
        if batch > self.max_batch:
            return sample_codes(self._sampler, dec_output, eos_forbidden, eos_forced)
        size = bucket_rows(batch)
        bucket = self._buckets.get(size)
        static_out, static_forbidden, static_forced = bucket.inputs
        static_out[:batch].copy_(dec_output[:batch])
        if self._use_cfg:
            static_out[size : size + batch].copy_(dec_output[batch:])
        static_forbidden[:batch].copy_(eos_forbidden)
        static_forced[:batch].copy_(eos_forced)
        return bucket()[:batch].clone()

    def _prepare(self, size: int) -> FixedCall:
        rows = 2 * size if self._use_cfg else size
        inputs = (
            torch.zeros(rows, self._embedding, device=self._device),
            torch.zeros(size, dtype=torch.bool, device=self._device),
            torch.zeros(size, dtype=torch.bool, device=self._device),
        )
        return FixedCall(functools.partial(sample_codes, self._sampler), inputs, self._pool)
