"""A llama GGUF whose weights make it say a given reply, for tests of what a random model
cannot be relied on to produce (tool calls above all).

The model is a bigram machine: attention and feed-forward weights are zero, so each
position's hidden state is its own token's embedding (one-hot), and the output matrix maps
each token to the one that follows it. After the newline that ends the chat template's
generation prompt it says the script, one token per piece, then ends its turn; any other
token is followed by the end of the turn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from servers.llm.random_model import END_OF_TURN, vocabulary, write_llama_gguf

NEWLINE = "<0x0A>"


def write_scripted_llama_gguf(path: str | Path, script: list[str]) -> Path:
    """``script``: the reply's pieces, each a token of its own (spaces are fine, newlines not)."""
    pieces = tuple(piece.replace(" ", "\u2581") for piece in script)
    vocab = vocabulary(extra=pieces)
    token = {piece: i for i, piece in enumerate(vocab[0])}
    size = len(vocab[0])
    n_embd = -(-size // 8) * 8
    following = dict.fromkeys(range(size), END_OF_TURN)
    chain = [token[NEWLINE], *(token[p] for p in pieces)]
    following.update(zip(chain, chain[1:]))
    embedding = np.zeros((size, n_embd), np.float32)
    embedding[np.arange(size), np.arange(size)] = 1.0
    output = np.zeros((size, n_embd), np.float32)
    output[list(following.values()), list(following.keys())] = 1.0
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
    return write_llama_gguf(path, vocab, tensors, n_head=1)
