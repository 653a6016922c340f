"""Counting, on the CPU, the casts of a model's weights that a step runs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _WeightCasts(TorchDispatchMode):
    def __init__(self, storages: set[int]):
        super().__init__()
        self._storages = storages
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if (
            isinstance(source, torch.Tensor)
            and isinstance(result, torch.Tensor)
            and result.dtype != source.dtype
            and source.untyped_storage().data_ptr() in self._storages
        ):
            self.count += 1
        return result


def weight_casts(module: torch.nn.Module, call: Callable[[], object], *, inference: bool = True) -> int:
    """How many times ``call`` turns one of ``module``'s parameters into another dtype
    (``inference=False``: outside inference mode, where autocast may cache the casts)."""
    mode = _WeightCasts({p.untyped_storage().data_ptr() for p in module.parameters()})
    with torch.inference_mode(inference), mode:
        call()
    return mode.count
