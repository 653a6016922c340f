"""How the next token is chosen: OpenAI's sampling fields, and the ones vLLM and
llama.cpp's server add, as a llama.cpp sampler chain."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np


class SamplingRejected(ValueError):
    """The sampling asked for does not fit the model (a bias for a token it lacks)."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    top_k: int | None = None
    """None: the engine's default; 0 or less: every token."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    """Divides a positive logit of a token already generated (multiplies a negative one)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Added to those tokens' logits (-100 bans a token, as with OpenAI)."""
    seed: int | None = None

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def plain_greedy(self) -> bool:
        """The likeliest token by the model's own logits."""
        return self.temperature <= 0 and not self.penalized and not self.logit_bias


class ArgmaxSampler:
    """Greedy decoding as llama.cpp's greedy sampler decides (the first of the likeliest
    tokens), read straight off the logits: llama.cpp's first writes a candidate record for
    every token of the vocabulary, which makes a token's sampling take twice as long
    (``bench/llm_sampling.py``)."""

    def __init__(self, n_vocab: int):
        self._n_vocab = n_vocab

    def sample(self, ctx, idx: int) -> int:
        """The next token from the logits at ``idx`` of ``ctx`` (a ``LlamaContext``)."""
        return int(np.argmax(logits_at(ctx, idx, self._n_vocab)))

    def accept(self, token: int) -> None:
        """A token said without sampling: greedy decoding keeps no state."""


def logits_at(ctx, idx: int, n_vocab: int) -> np.ndarray:
    """The logits llama.cpp computed at batch position ``idx`` of ``ctx`` (-1: the last), as
    a view."""
    from llama_cpp import llama_get_logits_ith

    return np.ctypeslib.as_array(llama_get_logits_ith(ctx.ctx, idx), shape=(n_vocab,))


def token_sampler(sampling: Sampling, *, n_vocab: int, default_top_k: int, window: int):
    """What picks each token for ``sampling``: an ``ArgmaxSampler`` for plain greedy
    decoding, else :func:`sampler_chain`'s."""
    if sampling.plain_greedy:
        return ArgmaxSampler(n_vocab)
    return sampler_chain(sampling, n_vocab=n_vocab, default_top_k=default_top_k, window=window)


def sampler_chain(sampling: Sampling, *, n_vocab: int, default_top_k: int, window: int):
    """A ``LlamaSampler`` that picks as ``sampling`` asks, in llama.cpp's own order (biases
    and penalties on the logits, then the cut-offs, then temperature); the penalties
    count the last ``window`` tokens generated. Only what a request asks for is in the
    chain: each sampler costs CPU time on every token."""
    from llama_cpp._internals import LlamaSampler

    foreign = [token for token in sampling.logit_bias if not 0 <= token < n_vocab]
    if foreign:
        raise SamplingRejected(f"logit_bias: token {foreign[0]} is not in the model's vocabulary of {n_vocab}")
    chain = LlamaSampler()
    if sampling.logit_bias:
        chain.add_logit_bias(n_vocab, sampling.logit_bias)
    if sampling.penalized:
        chain.add_penalties(
            n_vocab, window, sampling.repetition_penalty, sampling.frequency_penalty, sampling.presence_penalty
        )
    if sampling.temperature <= 0:
        chain.add_greedy()
        return chain
    top_k = default_top_k if sampling.top_k is None else sampling.top_k
    if top_k > 0:
        # First, so that top_p sorts k candidates rather than the whole vocabulary.
        chain.add_top_k(top_k)
    chain.add_top_p(sampling.top_p, 1)
    if sampling.min_p > 0:
        chain.add_min_p(sampling.min_p, 1)
    chain.add_temp(sampling.temperature)
    chain.add_dist(sampling.seed if sampling.seed is not None else random.getrandbits(32))
    return chain
