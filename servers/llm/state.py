"""The model's state at the end of a user turn, kept so a diverged conversation need not
start over.

A hybrid Mamba model (Nemotron 3 Nano) cannot remove the end of its cached state: when
the next request differs from what was generated — a barge-in cut the reply short, so
the client's copy of it is shorter — everything would be evaluated again. Instead the
engine snapshots the sequence's state (llama.cpp's per-sequence state, host memory)
right after each user turn and, on divergence, restores it and evaluates only the
reply as the client has it and the new turn.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

SEQUENCE = 0


@dataclass(frozen=True)
class StateSnapshot:
    tokens: tuple[int, ...]
    """What the state had evaluated when it was taken."""
    data: ctypes.Array
    size: int


def can_roll_back(llm) -> bool:
    """Whether the end of the cached state can be removed (transformers: yes)."""
    import llama_cpp

    model = llm.model
    return not (llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model))


def take_snapshot(llm, replacing: StateSnapshot | None = None) -> StateSnapshot:
    """The sequence's state now, written into the buffer of the snapshot it replaces when
    that holds it: the state is tens of MiB for the real model, and a fresh buffer each
    turn costs its allocation and page faults before the turn's first token. A buffer is
    made twice the size needed, as the state grows with the conversation's tokens."""
    import llama_cpp

    size = llama_cpp.llama_state_seq_get_size(llm.ctx, SEQUENCE)
    if replacing is not None and len(replacing.data) >= size:
        data = replacing.data
    else:
        data = (ctypes.c_uint8 * (2 * size))()
    written = llama_cpp.llama_state_seq_get_data(llm.ctx, data, size, SEQUENCE)
    return StateSnapshot(tuple(int(t) for t in llm.input_ids[: llm.n_tokens]), data, written)


def restore_snapshot(llm, snapshot: StateSnapshot) -> bool:
    """Make the context hold exactly the snapshot's state; False if llama.cpp refused."""
    import llama_cpp

    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), SEQUENCE, -1, -1)
    llm.n_tokens = 0
    if llama_cpp.llama_state_seq_set_data(llm.ctx, snapshot.data, snapshot.size, SEQUENCE) == 0:
        return False
    count = len(snapshot.tokens)
    llm.input_ids[:count] = snapshot.tokens
    llm.n_tokens = count
    return True
