"""Log probabilities of the generated tokens, as OpenAI's ``logprobs`` asks for them.

They are the model's own (a softmax of its raw logits), not the sampling's: temperature,
penalties, biases and a grammar change which token is chosen, not how likely the model
found it, as vLLM reports them by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MAX_TOP_LOGPROBS = 20
"""OpenAI's limit on the alternatives listed per token."""


@dataclass(frozen=True)
class TokenLogprob:
    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()
    """The ``top_logprobs`` likeliest tokens at the same place and theirs, likeliest first."""


def token_logprob(logits: np.ndarray, token: int, top: int, text_of: Callable[[int], bytes]) -> TokenLogprob:
    """``token``'s log probability under ``logits`` and the ``top`` likeliest tokens'.
    Two passes over the vocabulary (``bench/llm_sampling.py``), so only when asked; in
    float32, as the logits are (float64 takes three times as long)."""
    peak = logits.max()
    log_total = peak + np.log(np.exp(logits - peak).sum())
    best = np.argpartition(logits, -top)[-top:] if top else np.empty(0, dtype=np.int64)
    best = best[np.argsort(-logits[best], kind="stable")]
    return TokenLogprob(
        token=text_of(token),
        logprob=float(logits[token] - log_total),
        top=tuple((text_of(int(t)), float(logits[t] - log_total)) for t in best),
    )


def openai_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    """The ``logprobs`` object of a choice (or of a stream chunk's)."""
    return {
        "content": [
            {**_openai_token(e.token, e.logprob), "top_logprobs": [_openai_token(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


def _openai_token(token: bytes, logprob: float) -> dict:
    """A token as OpenAI lists it: its text (a token that is part of a character shows
    U+FFFD; ``bytes`` has it exactly)."""
    return {"token": token.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(token)}
