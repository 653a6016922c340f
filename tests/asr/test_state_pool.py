"""Sessions' state rows go back to the initial state together when their utterances end."""

from __future__ import annotations

import pytest
import torch

from servers.asr.state_pool import PooledTensor, StatePool
from servers.common.engine import EngineFull


def _pool(sessions: int) -> StatePool:
    layout = {
        "cache": PooledTensor(torch.full((2, 1, 3), 0.5), 1),
        "labels": PooledTensor(torch.tensor([7]), 0),
        "predictor": PooledTensor(torch.zeros(1, 1, 4), 1),
    }
    return StatePool(layout, sessions, sessions)


def test_a_reset_restores_exactly_the_slots_named():
    pool = _pool(6)
    slots = torch.tensor([pool.acquire() for _ in range(6)])
    pool.scatter(slots, {name: value + 1 for name, value in pool.gather(slots).items()})
    ended = [int(slots[1]), int(slots[4])]
    pool.reset(ended)
    state = pool.gather(slots)
    for i, slot in enumerate(slots.tolist()):
        expected = 0 if slot in ended else 1
        assert torch.all(state["cache"][:, i] == 0.5 + expected)
        assert state["labels"][i] == 7 + expected
        assert torch.all(state["predictor"][:, i] == expected)


def _ops(run) -> int:
    with torch.profiler.profile() as profile:
        run()
    return len(profile.events())


def test_resetting_many_slots_costs_as_many_ops_as_one():
    """On a GPU each op is a kernel launch: a step that ends dozens of utterances must not
    launch per utterance and per state tensor."""
    pool = _pool(32)
    slots = [pool.acquire() for _ in range(32)]
    one = _ops(lambda: pool.reset(slots[:1]))
    many = _ops(lambda: pool.reset(slots[:24]))
    assert many == one


def test_a_full_pool_refuses_a_session_as_a_full_server_does():
    """A session closed while its step runs keeps its slot until the step ends: a client
    that comes in meanwhile is told the server is full, like any other over the limit."""
    pool = _pool(2)
    for _ in range(2):
        pool.acquire()
    with pytest.raises(EngineFull):
        pool.acquire()
