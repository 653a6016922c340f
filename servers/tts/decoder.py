"""Magpie's decoder loop, one batched step at a time, over sequences that come and go.

NeMo's ``generate_speech`` runs a whole utterance inside one call, so sessions could
neither share decoder steps, nor stop within a step, nor hear audio before the end. This
module drives the same loop from outside with the model's own pieces (text encoder,
decoder layers, local-transformer sampling, attention prior, EOS detection): each
``step`` advances every given sequence by one decoder step (``frame_stacking_factor``
codec frames), each at its own position, computing only its new position against a
key/value cache (``servers.tts.kv_cache``). A sequence joins through ``start`` and leaves
by not being passed to ``step``. Per sequence the result equals ``generate_speech`` run
alone with NeMo's decoder cache on, as NeMo's own inference runs it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger

from servers.tts.advance import AdvanceStep, GraphedAdvance, GraphedPrefill, GraphedText, embed_frame_stack, write_text
from servers.tts.bookkeeping import PriorRules, first_eos_frames, inference_prior, most_attended, text_progress
from servers.tts.kv_cache import CachedDecoder
from servers.tts.sampling import CodeSampler, GraphedSampler, sample_codes

PREFILL_GRAPH_MAX_BATCH = 8
"""Most segments whose prefill replays a graph: a step starts the segments that arrived
since the last one, a few; larger buckets would hold ~200 positions of activations each
for rare use (more run eagerly)."""


@dataclass
class Sequence:
    """One chunk of text being spoken, and its decoder state between steps."""

    tokens: torch.Tensor
    """Text token ids, EOS included."""
    voice: int
    max_frames: int
    """Stop after this many codec frames even without end of speech."""
    rows: list[int] = field(default_factory=list)
    """Its rows in the decoder's key/value cache: conditional, then unconditional with CFG."""
    cached: int = 0
    """Decoder positions in the cache (0 until its first step)."""
    steps: int = 0
    end_frame: int | None = None
    """Frames of speech (end of speech or ``max_frames`` reached), once known."""
    last_attended: int = 1
    attention_counter: dict[int, int] = field(default_factory=dict)
    prior: np.ndarray | None = None
    """Attention prior over the text for the next step."""
    unfinished: bool = False
    finished_count: int | None = None

    @property
    def done(self) -> bool:
        return self.end_frame is not None

    @property
    def codes(self) -> torch.Tensor | None:
        """Codes so far ``(codebooks, frames)``, the BOS stack first (a view: read it before
        the next step)."""
        return None if self._store is None else self._store.tensor[self._slot, :, : self._length]

    @property
    def frames(self) -> int:
        """Codec frames generated so far, the BOS stack excluded."""
        return self._length - self._bos_frames

    @property
    def speech_frames(self) -> int:
        return self.frames if self.end_frame is None else min(self.frames, self.end_frame)

    _store: CodeStore | None = None
    _slot: int = 0
    _length: int = 0
    """Frames in its codes, the BOS stack included."""
    _bos_frames: int = 0


class CodeStore:
    """Codes of many sequences in one tensor ``(slots, codebooks, frames)``: a step writes
    every sequence's new frame stack, and reads every newest stack, in one operation each
    instead of one per sequence (on a GPU, a kernel launch each)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    @functools.cached_property
    def _codebook_index(self) -> torch.Tensor:
        """Made on first use: a leaving sequence's store of its own is only ever read whole."""
        return torch.arange(self.tensor.shape[1], device=self.tensor.device)[None, :, None]

    def ensure(self, slots: int, frames: int) -> None:
        """Room for this many slots of this many frames (grown by doubling)."""
        have_slots, codebooks, have_frames = self.tensor.shape
        if slots <= have_slots and frames <= have_frames:
            return
        frames = max(frames, 2 * have_frames) if frames > have_frames else have_frames
        grown = self.tensor.new_zeros(max(slots, have_slots), codebooks, frames)
        grown[:have_slots, :, :have_frames] = self.tensor
        self.tensor = grown

    def _index(self, slots: list[int], starts: list[int], count: int):
        """Advanced-indexing tensors for ``count`` frames of each slot from its start (sent
        to the device without waiting for it)."""
        device = self.tensor.device
        rows = torch.tensor([slots, starts]).to(device, non_blocking=True)
        frames = rows[1][:, None] + torch.arange(count, device=device)
        return rows[0][:, None, None], self._codebook_index, frames[:, None, :]

    def read(self, slots: list[int], starts: list[int], count: int) -> torch.Tensor:
        """Frames ``start .. start + count - 1`` of each slot, ``(len(slots), codebooks, count)``."""
        return self.tensor[self._index(slots, starts, count)]

    def write(self, slots: list[int], starts: list[int], codes: torch.Tensor) -> None:
        """``codes`` ``(len(slots), codebooks, count)`` into each slot from its start."""
        self.tensor[self._index(slots, starts, codes.shape[-1])] = codes


Decoded = tuple[torch.Tensor, torch.Tensor | None]
"""Decoder hidden state at each row's newest position (conditional rows first) and the
conditional rows' alignment over their text (None without the attention prior)."""


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
        ip = model.inference_parameters
        self._eos_method = EOSDetectionMethod(ip.eos_detection_method)
        self._prior_rules = PriorRules(ip.attention_prior_epsilon, ip.attention_prior_lookahead_window)
        self._sampler = CodeSampler(model, autocast_dtype)
        self.sampler_graphs = (
            GraphedSampler(self._sampler, model.cfg.decoder.d_model, use_cfg, graph_max_batch)
            if graph_max_batch > 0
            else None
        )
        self._sample = self.sampler_graphs or functools.partial(sample_codes, self._sampler)
        self._branches = 2 if use_cfg else 1
        self.transformer = CachedDecoder(model, autocast_dtype or next(model.parameters()).dtype)
        self._advance_step = AdvanceStep(model, self.transformer, self._branches, autocast_dtype)
        self.advance_graphs = (
            GraphedAdvance(self._advance_step, self.transformer, model, self._branches, graph_max_batch)
            if graph_max_batch > 0
            else None
        )
        self._context_lengths = [int(n) for n in model.baked_context_embedding_len.tolist()]
        """Per voice, the decoder positions of its baked context (read once: no device reads per sequence)."""
        self.prefill_graphs = (
            GraphedPrefill(
                self.transformer,
                width=max(self._context_lengths) + 1,
                d_model=model.cfg.decoder.d_model,
                autocast_dtype=autocast_dtype,
                branches=self._branches,
                max_batch=min(graph_max_batch, PREFILL_GRAPH_MAX_BATCH),
            )
            if graph_max_batch > 0
            else None
        )
        self.text_graphs = (
            GraphedText(
                model,
                self.transformer,
                autocast_dtype,
                branches=self._branches,
                max_batch=min(graph_max_batch, PREFILL_GRAPH_MAX_BATCH),
            )
            if graph_max_batch > 0
            else None
        )
        self._live: dict[int, Sequence] = {}
        """Started sequences by id, until a step leaves them out."""
        self._codes = CodeStore(torch.zeros(0, model.num_audio_codebooks, 0, dtype=torch.long, device=self.device))
        """The live sequences' codes, a slot per sequence (its conditional cache row)."""

    def reserve(self, sequences: int, max_frames: int, max_text_tokens: int) -> None:
        """Allocate the key/value cache for this many sequences at once, of up to these
        lengths, now: memory is known at start-up, and CUDA graphs need buffers that stay."""
        pool = self.transformer.pool
        pool.reserve(
            sequences * self._branches, self._cache_positions(max(self._context_lengths), max_frames), max_text_tokens
        )
        self._codes.ensure(pool.rows, self._code_frames(max_frames))
        logger.info(
            f"TTS key/value cache: {pool.rows} rows of {pool.positions} positions and {pool.text_positions} "
            f"text positions, {pool.nbytes / 2**30:.2f} GiB"
        )

    @torch.inference_mode()
    def prepare_graphs(self) -> None:
        """Capture the text encoder, the decoder step, the prefill and the code sampler for
        every batch size now (before serving, after ``reserve``)."""
        for graphs in (self.text_graphs, self.advance_graphs, self.prefill_graphs, self.sampler_graphs):
            if graphs is not None:
                graphs.prepare_all()

    @property
    def graph_batches(self) -> dict[str, int]:
        """Largest batch the text encoder, the decoder step, the prefill and the code sampler
        replay from CUDA graphs now (0: eager, from the start, after a failed capture, or
        after the cache grew)."""
        return {
            "text_encoder": self.text_graphs.batch_limit if self.text_graphs else 0,
            "decoder_step": self.advance_graphs.batch_limit if self.advance_graphs else 0,
            "prefill": self.prefill_graphs.batch_limit if self.prefill_graphs else 0,
            "sampler": self.sampler_graphs.max_batch if self.sampler_graphs else 0,
        }

    def _start(self, sequences: list[Sequence]) -> None:
        """Encode the text of new sequences (one batched call), give each its cache rows and
        set its BOS frames; their prefix goes through the decoder in this step."""
        m, fs, count = self.model, self.frames_per_step, len(sequences)
        lengths = [len(s.tokens) for s in sequences]
        # Padded on the host, then one copy: not a copy per sequence and a padding kernel.
        text = torch.nn.utils.rnn.pad_sequence([s.tokens.cpu() for s in sequences], batch_first=True).to(self.device)
        positions = max(self._cache_positions(self._context_lengths[s.voice], s.max_frames) for s in sequences)
        rows = self.transformer.pool.allocate(count * self._branches, positions, text.shape[1])
        try:
            if self.text_graphs is not None and self.text_graphs.covers(count):
                self.text_graphs(text, lengths, rows)
            else:
                index = torch.tensor([rows, lengths + [1] * (len(rows) - count)], device=self.device)
                write_text(m, self.transformer, text, index[1, :count], index[0], self._branches)
            self._codes.ensure(self.transformer.pool.rows, self._code_frames(max(s.max_frames for s in sequences)))
            self._codes.write(
                rows[:count],
                [0] * count,
                torch.full((count, m.num_audio_codebooks, fs), m.audio_bos_id, device=self.device),
            )
        except BaseException:
            # No sequence holds these rows yet: nothing else would give them back.
            self.transformer.pool.release(rows)
            raise
        for i, s in enumerate(sequences):
            s.rows = rows[i::count]
            s._store, s._slot, s._length, s._bos_frames = self._codes, rows[i], fs, fs
            self._live[id(s)] = s

    def _code_frames(self, max_frames: int) -> int:
        """Code frames a sequence may hold: the BOS stack, then up to ``max_frames`` (and
        one more stack, should a finished sequence be stepped once more)."""
        return self.frames_per_step + max_frames + self.frames_per_step

    @torch.inference_mode()
    def step(self, sequences: list[Sequence]) -> None:
        """Advance each sequence by one decoder step (its codes grow by a frame stack),
        starting those it has not seen yet.

        Sequences seen before but not passed in leave first, so their cache rows go to the
        new ones: the cache then never outgrows what was reserved (and captured in graphs).
        """
        m, ip, fs, batch = self.model, self.model.inference_parameters, self.frames_per_step, len(sequences)
        self._release_absent(sequences)
        if not sequences:
            return
        new = [s for s in sequences if not s.rows]
        if new:
            self._start(new)
        ongoing = [s for s in sequences if s.cached]
        fresh = [s for s in sequences if not s.cached]
        sequences = ongoing + fresh
        parts = [self._advance(ongoing)] if ongoing else []
        if fresh:
            parts.append(self._prefill(fresh))
        hidden, alignment = self._join(parts)
        # On its way to the host while the GPU projects the logits: NeMo's bookkeeping then
        # runs on the CPU meanwhile. It goes before sampling, as in NeMo: whether speech may
        # (or must) end follows this step's attention.
        alignment = _HostCopy(alignment.float()) if alignment is not None else None
        logits = m.final_proj(hidden)
        newest_logits = logits[:batch]
        if self.use_cfg:
            newest_logits = (1 - ip.cfg_scale) * logits[batch:] + ip.cfg_scale * newest_logits
        if alignment is not None:
            self._update_attention(sequences, alignment.wait())

        eos_forbidden = torch.tensor(
            [s.steps * fs < ip.min_generated_frames or s.unfinished for s in sequences], device=self.device
        )
        eos_forced = torch.tensor(self._eos_forced(sequences), device=self.device)
        next_codes = self._sample(hidden, eos_forbidden, eos_forced)
        argmax_codes = self.argmax_codes(newest_logits, eos_forbidden, eos_forced)
        # On host copies: the GPU is waited for once, not per row.
        eos_frames = first_eos_frames(
            next_codes.cpu().numpy(), argmax_codes.cpu().numpy(), m.audio_eos_id, self._eos_method
        )
        lengths = [s._length for s in sequences]
        self._codes.ensure(self._codes.tensor.shape[0], max(lengths) + fs)
        self._codes.write([s._slot for s in sequences], lengths, next_codes)
        for s, eos_frame in zip(sequences, eos_frames.tolist()):
            if eos_frame != float("inf"):
                s.end_frame = s.steps * fs + int(eos_frame)
            s._length += fs
            s.steps += 1
            if s.end_frame is None and s.frames >= s.max_frames:
                s.end_frame = s.max_frames

    def _cache_positions(self, context_length: int, max_frames: int) -> int:
        """Decoder positions a sequence may fill: its voice's context, the BOS stack, then
        one per decoder step."""
        return context_length + 1 + -(-max_frames // self.frames_per_step)

    def _release_absent(self, sequences: list[Sequence]) -> None:
        """Leavers give back their cache rows and code slots (keeping a copy of their codes)."""
        present = {id(s) for s in sequences}
        for key in [key for key in self._live if key not in present]:
            s = self._live.pop(key)
            self.transformer.pool.release(s.rows)
            s._store, s._slot = CodeStore(s.codes[None].clone()), 0

    def _prefill(self, sequences: list[Sequence]) -> Decoded:
        """Each new sequence's prefix (its voice's context, then the BOS frames) into the cache."""
        m, count = self.model, len(sequences)
        context, _ = m.get_baked_context_embeddings_batch(count, [s.voice for s in sequences])
        bos = embed_frame_stack(m, self._codes.read([s._slot for s in sequences], [0] * count, self.frames_per_step))
        lengths = [self._context_lengths[s.voice] for s in sequences]
        prefixes = [torch.cat([context[i, :length], bos[i : i + 1]]) for i, length in enumerate(lengths)]
        if self.use_cfg:  # NeMo's unconditional context: zeros of the same length
            prefixes += [torch.cat([torch.zeros_like(p[:-1]), p[-1:]]) for p in prefixes]
        rows, _, text_lengths = self._row_lists(sequences)
        x, last = torch.nn.utils.rnn.pad_sequence(prefixes, batch_first=True), [len(p) - 1 for p in prefixes]
        for s, length in zip(sequences, lengths):
            s.cached = length + 1
        if self.prefill_graphs is not None and self.prefill_graphs.covers(count):
            return self.prefill_graphs(x, rows, last, text_lengths)
        decoded = self.transformer.decode(
            x, rows, start=[0] * len(rows), last=last, text_lengths=text_lengths, prior=None
        )
        alignment = decoded.alignment[:count] if decoded.alignment is not None else None
        return decoded.hidden, alignment

    def _advance(self, sequences: list[Sequence]) -> Decoded:
        """Each sequence's newest frame stack, one position, into the cache."""
        fs = self.frames_per_step
        codes = self._codes.read([s._slot for s in sequences], [s._length - fs for s in sequences], fs)
        rows, start, text_lengths = self._row_lists(sequences)
        prior = self._prior(sequences)
        if self.advance_graphs is not None and self.advance_graphs.covers(len(sequences)):
            decoded = self.advance_graphs(codes, rows, start, text_lengths, prior)
        else:
            index = torch.tensor([rows, start, text_lengths], device=self.device)
            decoded = self._advance_step(codes, *index, prior, span=max(start) + 1, text_span=max(text_lengths))
        for s in sequences:
            s.cached += 1
        return decoded

    def _row_lists(self, sequences: list[Sequence]) -> tuple[list[int], list[int], list[int]]:
        """Per cache row, conditional rows first: its row, its cached positions, its text length."""
        rows = [s.rows[branch] for branch in range(self._branches) for s in sequences]
        start = [s.cached for s in sequences] * self._branches
        text_lengths = [len(s.tokens) for s in sequences] + [1] * (len(rows) - len(sequences))
        return rows, start, text_lengths

    def _prior(self, sequences: list[Sequence]) -> torch.Tensor | None:
        """The rows' attention priors over their text ``(rows, T_text)``, assembled on the
        host and sent in one copy; the unconditional rows' is flat, as NeMo's."""
        if not any(s.prior is not None for s in sequences):
            return None
        prior = np.ones((self._branches * len(sequences), max(len(s.tokens) for s in sequences)), dtype=np.float32)
        for i, s in enumerate(sequences):
            if s.prior is not None:
                prior[i, : len(s.prior)] = s.prior
        prior[len(sequences) :] = self._prior_rules.epsilon
        return torch.from_numpy(prior).to(self.device)

    def _join(self, parts: list[Decoded]) -> Decoded:
        """Outputs of the ongoing and the fresh rows as one batch, conditional rows first,
        and the conditional rows' alignment over the text ``(B, T_text)``."""
        halves = [hidden.chunk(self._branches) for hidden, _ in parts]
        hidden = torch.cat([half[branch] for branch in range(self._branches) for half in halves])
        if parts[0][1] is None:
            return hidden, None
        width = max(alignment.shape[-1] for _, alignment in parts)
        return hidden, torch.cat([F.pad(alignment, (0, width - alignment.shape[-1])) for _, alignment in parts])

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

    def _update_attention(self, sequences: list[Sequence], scores: torch.Tensor) -> None:
        """Where each row attends in its text, and the prior that keeps it moving forward
        (``servers.tts.bookkeeping``: NeMo's rules, batched, on a host copy of the scores
        ``(B, T_text)``)."""
        ip = self.model.inference_parameters
        text_lens = [len(s.tokens) for s in sequences]
        counters = [s.attention_counter for s in sequences]
        attended = most_attended(
            scores.numpy(), [s.last_attended for s in sequences], counters, text_lens, self._prior_rules.window
        )
        prior = inference_prior(attended, counters, text_lens, scores.shape[1], self._prior_rules)
        unfinished, finished = text_progress(attended, text_lens, [s.finished_count for s in sequences])
        for i, s in enumerate(sequences):
            s.last_attended = attended[i]
            s.prior = prior[i, : text_lens[i]]
            s.unfinished = unfinished[i] and not ip.ignore_finished_sentence_tracking
            s.finished_count = finished[i]


class _HostCopy:
    """A copy of a device tensor to the host, started at once and waited for when read."""

    def __init__(self, tensor: torch.Tensor):
        self._ready = None
        if tensor.device.type != "cuda":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()

    def wait(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host
