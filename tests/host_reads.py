"""Finding, on the CPU, what would stop a CUDA graph capture: a read back from the device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

HOST_READS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim"})
"""Operations that wait for the device and read a value back: no CUDA graph can hold one,
and a capture that meets one fails (the part then runs eagerly, unseen on this CPU)."""


def operations(call: Callable[[], object]) -> set[str]:
    """The names of the operations ``call`` runs."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as profiled:
        call()
    return {e.name for e in profiled.events()}
