"""A llama GGUF whose weights make it say a given reply, for tests of what a random model
cannot be relied on to produce (tool calls above all).

The model is a bigram machine: attention and feed-forward weights are zero, so each
position's hidden state is its own token's embedding (one-hot), and the output matrix
gives each token's followers their logits. A scripted model says its script after the
newline that ends the chat template's generation prompt, one token per piece, then ends
its turn; any other token is followed by the end of the turn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from servers.llm.random_model import END_OF_TURN, vocabulary, write_llama_gguf

NEWLINE = "<0x0A>"


SURE = 16.0
"""The logit of a scripted follower (every other token's is 0)."""


def write_scripted_llama_gguf(path: str | Path, script: list[str]) -> Path:
    """``script``: the reply's pieces, each a token of its own (spaces are fine, newlines not)."""
    chain = [NEWLINE, *script]
    return write_bigram_llama_gguf(path, [(a, b, SURE) for a, b in zip(chain, chain[1:])])


def write_bigram_llama_gguf(path: str | Path, edges: list[tuple[str, str, float]], **gguf) -> Path:
    """A model whose next-token logits depend on the last token alone: ``(piece, follower,
    logit)`` for each follower a piece has (0 for the others; a piece without followers is
    followed by the end of the turn). Pieces are tokens of their own (spaces are fine).
    ``gguf``: for :func:`write_llama_gguf` (a chat template)."""
    pieces = tuple(dict.fromkeys(_piece(p) for a, b, _ in edges for p in (a, b) if p != NEWLINE))
    vocab = vocabulary(extra=pieces)
    token = {piece: i for i, piece in enumerate(vocab[0])}
    size = len(vocab[0])
    n_embd = -(-size // 8) * 8
    logits = np.zeros((size, size), np.float32)
    logits[np.arange(size), END_OF_TURN] = SURE
    for a, b, logit in edges:
        row = token[_piece(a)]
        if logits[row, END_OF_TURN] == SURE:
            logits[row, END_OF_TURN] = 0.0
        logits[row, token[_piece(b)]] = logit
    embedding = np.zeros((size, n_embd), np.float32)
    embedding[np.arange(size), np.arange(size)] = 1.0
    # The final norm scales a one-hot hidden state to sqrt(n_embd).
    output = np.zeros((size, n_embd), np.float32)
    output[:, :size] = logits.T / np.sqrt(n_embd)
    zeros = {
        "attn_q": (n_embd, n_embd),
        "attn_k": (n_embd, n_embd),
        "attn_v": (n_embd, n_embd),
        "attn_output": (n_embd, n_embd),
        "ffn_gate": (8, n_embd),
        "ffn_up": (8, n_embd),
        "ffn_down": (n_embd, 8),
    }
    tensors = {"token_embd.weight": embedding, "output.weight": output}
    tensors |= {f"blk.0.{part}.weight": np.zeros(shape, np.float32) for part, shape in zeros.items()}
    return write_llama_gguf(path, vocab, tensors, n_head=1, **gguf)


def _piece(text: str) -> str:
    return text.replace(" ", "\u2581")
