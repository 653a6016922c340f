"""Finding, on the CPU, what would stop a CUDA graph capture: a read back from the device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from servers.common.cuda_graphs import HOST_READS

__all__ = ["HOST_READS", "operations"]


def operations(call: Callable[[], object]) -> set[str]:
    """The names of the operations ``call`` runs."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as profiled:
        call()
    return {e.name for e in profiled.events()}
