"""Magpie's decoder loop, one batched step at a time, over sequences that come and go.

NeMo's ``generate_speech`` runs a whole utterance inside one call, so sessions could
neither share decoder steps, nor stop within a step, nor hear audio before the end. This
module drives the same loop from outside with the model's own pieces (text encoder,
decoder forward, local-transformer sampling, attention prior, EOS detection): each
``step`` advances every given sequence by one decoder step (``frame_stacking_factor``
codec frames), each at its own position. A sequence joins by being passed in, leaves by
not being passed in. Per sequence the result equals ``generate_speech`` run alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from servers.tts.sampling import CodeSampler, GraphedSampler, sample_codes


@dataclass
class Sequence:
    """One chunk of text being spoken, and its decoder state between steps."""

    tokens: torch.Tensor
    """Text token ids, EOS included."""
    voice: int
    max_frames: int
    """Stop after this many codec frames even without end of speech."""
    encoded: torch.Tensor | None = None
    """Text encoder output ``(T_text, E)``, computed once when the sequence starts."""
    codes: torch.Tensor | None = None
    """Codes so far ``(codebooks, frames)``, the BOS stack first."""
    steps: int = 0
    end_frame: int | None = None
    """Frames of speech (end of speech or ``max_frames`` reached), once known."""
    last_attended: int = 1
    attention_counter: dict[int, int] = field(default_factory=dict)
    prior: torch.Tensor | None = None
    """Attention prior over the text for the next step."""
    unfinished: bool = False
    finished_count: int | None = None

    @property
    def done(self) -> bool:
        return self.end_frame is not None

    @property
    def frames(self) -> int:
        """Codec frames generated so far, the BOS stack excluded."""
        return 0 if self.codes is None else self.codes.shape[-1] - self._bos_frames

    @property
    def speech_frames(self) -> int:
        return self.frames if self.end_frame is None else min(self.frames, self.end_frame)

    _bos_frames: int = 0


class MagpieDecoder:
    """Batched single steps of a MagpieTTSModel's decoder."""

    def __init__(
        self, model, use_cfg: bool = True, autocast_dtype: torch.dtype | None = None, graph_max_batch: int = 0
    ):
        """``graph_max_batch`` > 0: steps of up to that many sequences sample their codes
        from CUDA graphs (``servers.tts.sampling``), captured by ``prepare_graphs``."""
        from nemo.collections.tts.modules.magpietts_modules import EOSDetectionMethod

        self.model = model
        self.use_cfg = use_cfg
        self.device = next(model.parameters()).device
        self.frames_per_step = model.frame_stacking_factor
        self._eos_method = EOSDetectionMethod(model.inference_parameters.eos_detection_method)
        self._sampler = CodeSampler(model, autocast_dtype)
        self.sampler_graphs = (
            GraphedSampler(self._sampler, model.cfg.decoder.d_model, use_cfg, graph_max_batch)
            if graph_max_batch > 0
            else None
        )
        self._sample = self.sampler_graphs or functools.partial(sample_codes, self._sampler)

    def prepare_graphs(self) -> None:
        """Capture the code sampler for every batch size now (before serving)."""
        if self.sampler_graphs is not None:
            self.sampler_graphs.prepare_all()

    @torch.inference_mode()
    def start(self, sequences: list[Sequence]) -> None:
        """Encode the text of new sequences (one batched call) and set their BOS frames."""
        m = self.model
        lengths = torch.tensor([len(s.tokens) for s in sequences], device=self.device)
        text = torch.nn.utils.rnn.pad_sequence([s.tokens.to(self.device) for s in sequences], batch_first=True)
        *_, encoded = m._encode_text_input({"text": text, "text_lens": lengths})
        for i, s in enumerate(sequences):
            s.encoded = encoded[i, : len(s.tokens)]
            s.codes = torch.full((m.num_audio_codebooks, self.frames_per_step), m.audio_bos_id, device=self.device)
            s._bos_frames = self.frames_per_step

    @torch.inference_mode()
    def step(self, sequences: list[Sequence]) -> None:
        """Advance each sequence by one decoder step (its codes grow by a frame stack)."""
        from nemo.collections.tts.parts.utils.helpers import get_mask_from_lengths

        m, ip, fs, batch = self.model, self.model.inference_parameters, self.frames_per_step, len(sequences)
        text_lens = torch.tensor([len(s.tokens) for s in sequences], device=self.device)
        cond = torch.nn.utils.rnn.pad_sequence([s.encoded for s in sequences], batch_first=True)
        cond_mask = get_mask_from_lengths(text_lens)
        context, context_lens = m.get_baked_context_embeddings_batch(batch, [s.voice for s in sequences])
        context_mask = get_mask_from_lengths(context_lens)
        code_lens = torch.tensor([s.codes.shape[-1] for s in sequences], device=self.device)
        codes = torch.nn.utils.rnn.pad_sequence([s.codes.T for s in sequences], batch_first=True).transpose(1, 2)
        embedded, embedded_lens = m.embed_audio_tokens(codes, code_lens)
        decoder_in = torch.cat([context, embedded], dim=1)
        decoder_mask = torch.cat([context_mask, get_mask_from_lengths(embedded_lens)], dim=1)
        last = context.shape[1] + embedded_lens - 1  # each row's newest position (rows are right-padded)
        prior = torch.ones(batch, 1, cond.shape[1], device=self.device)
        for i, s in enumerate(sequences):
            if s.prior is not None:
                prior[i, 0, : len(s.prior)] = s.prior
        if self.use_cfg:
            dummy_cond, dummy_mask, dummy_context, dummy_context_mask, _ = m.prepare_dummy_cond_for_cfg(
                cond, cond_mask, context, context_mask
            )
            unconditional_in, unconditional_mask = decoder_in.clone(), decoder_mask.clone()
            unconditional_in[:, : context.shape[1]] = dummy_context
            unconditional_mask[:, : context.shape[1]] = dummy_context_mask
            decoder_in = torch.cat([decoder_in, unconditional_in])
            decoder_mask = torch.cat([decoder_mask, unconditional_mask])
            cond, cond_mask = torch.cat([cond, dummy_cond]), torch.cat([cond_mask, dummy_mask])
            prior = torch.cat([prior, torch.full_like(prior, ip.attention_prior_epsilon)])
            last = torch.cat([last, last])
        layer_prior = None
        if any(s.prior is not None for s in sequences):
            layer_prior = [None] * m.decoder.n_layers
            for layer in ip.apply_prior_to_layers or range(m.decoder.n_layers):
                layer_prior[layer] = prior
        logits, attention, decoder_out, _ = m.forward(decoder_in, decoder_mask, cond, cond_mask, layer_prior, None)
        rows = torch.arange(decoder_out.shape[0], device=self.device)
        newest_out, newest_logits = decoder_out[rows, last], logits[rows, last]
        if self.use_cfg:
            newest_logits = (1 - ip.cfg_scale) * newest_logits[batch:] + ip.cfg_scale * newest_logits[:batch]

        eos_forbidden = torch.tensor(
            [s.steps * fs < ip.min_generated_frames or s.unfinished for s in sequences], device=self.device
        )
        eos_forced = torch.tensor(self._eos_forced(sequences), device=self.device)
        next_codes = self._sample(newest_out, eos_forbidden, eos_forced)
        argmax_codes = self.argmax_codes(newest_logits, eos_forbidden, eos_forced)
        if ip.apply_attention_prior:
            self._update_attention(sequences, attention, rows, last)
        # NeMo's per-row EOS search reads single values: on host copies it launches no
        # GPU work and waits for the GPU once, not twice per row.
        sampled_host, argmax_host = next_codes.cpu(), argmax_codes.cpu()
        for i, s in enumerate(sequences):
            eos_frame = m.detect_eos(sampled_host[i], argmax_host[i], self._eos_method)
            if eos_frame != float("inf"):
                s.end_frame = s.steps * fs + int(eos_frame)
            s.codes = torch.cat([s.codes, next_codes[i]], dim=-1)
            s.steps += 1
            if s.end_frame is None and s.frames >= s.max_frames:
                s.end_frame = s.max_frames

    def argmax_codes(self, logits: torch.Tensor, eos_forbidden: torch.Tensor, eos_forced: torch.Tensor) -> torch.Tensor:
        """The parallel head's most likely codes ``(B, codebooks, frames per step)``, which
        only EOS detection reads; ``eos_forbidden`` and ``eos_forced`` are ``(B,)`` row masks.

        What NeMo's ``sample_codes_from_logits(temperature=0.01, topk=1)`` returns (top-1
        sampling is the argmax), in a few tensor ops for all heads and rows instead of a
        loop of ~40 ops with host syncs per head.
        """
        heads = logits.reshape(len(logits), self.frames_per_step, self.model.num_audio_codebooks, -1)
        heads = self._sampler.restrict(heads, self._sampler.row_masks(eos_forbidden, eos_forced, heads.dim()))
        return heads.argmax(-1).transpose(1, 2)

    def _eos_forced(self, sequences: list[Sequence]) -> list[bool]:
        """Per sequence: it finished its text long enough ago that it may only end."""
        ip, config = self.model.inference_parameters, self.model.chunked_inference_config
        if ip.ignore_finished_sentence_tracking:
            return [False] * len(sequences)
        threshold = config.finished_limit_first_chunk
        return [(s.finished_count or 0) >= threshold for s in sequences]

    def _update_attention(self, sequences, attention, rows, last) -> None:
        """Where each row attends in its text, and the prior that keeps it moving forward
        (NeMo's own bookkeeping, fed one row at a time from each sequence's state).

        The bookkeeping indexes single values row by row, so it runs on a host copy of the
        scores (one wait for the GPU, no kernel launches) and the prior goes back in one copy.
        """
        m, ip, batch = self.model, self.model.inference_parameters, len(sequences)
        layers = [
            layer
            for layer in ip.estimate_alignment_from_layers or range(len(attention))
            if layer in m.transcript_decoder_layers
        ]
        scores = torch.stack([attention[layer]["cross_attn_probabilities"][0].mean(dim=1) for layer in layers], dim=1)
        scores = scores.mean(dim=1)[rows, last].float().cpu()
        text_lens = torch.tensor([len(s.tokens) for s in sequences])
        attended, counters = m.get_most_attended_text_timestep(
            alignment_attention_scores=scores,
            last_attended_timesteps=[[s.last_attended for s in sequences]],
            text_lens=text_lens,
            lookahead_window_size=ip.attention_prior_lookahead_window,
            attended_timestep_counter=[s.attention_counter for s in sequences],
            batch_size=batch,
        )
        unfinished: dict[int, bool] = {}
        finished = {i: s.finished_count for i, s in enumerate(sequences) if s.finished_count is not None}
        prior, unfinished, finished = m.construct_inference_prior(
            prior_epsilon=ip.attention_prior_epsilon,
            cross_attention_scores=scores,
            text_lens=text_lens,
            text_time_step_attended=attended,
            attended_timestep_counter=counters,
            unfinished_texts=unfinished,
            finished_texts_counter=finished,
            end_indices={},
            lookahead_window_size=ip.attention_prior_lookahead_window,
            batch_size=batch,
        )
        prior = prior.to(self.device)
        for i, s in enumerate(sequences):
            s.last_attended = attended[i]
            s.attention_counter = counters[i]
            s.prior = prior[i, 0, : len(s.tokens)]
            s.unfinished = unfinished.get(i, False) and not ip.ignore_finished_sentence_tracking
            s.finished_count = finished.get(i)
