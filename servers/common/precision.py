"""Choosing the autocast dtype for a model's GPU work, and storing weights for it."""

from __future__ import annotations

import torch

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Each ``--precision`` name but auto, and the autocast dtype it stands for (None: off)."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (auto: bf16 on CUDA, none i.e. fp32 elsewhere)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use auto, {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[precision]


def autocast(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` (None: off) without autocast's weight-cast cache, which a CUDA
    graph capture must not hold: the casts are then part of the graph."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None, cache_enabled=False)


AUTOCAST_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
"""Layers whose every call autocast runs in its lower precision, casting weight and bias."""


def store_weights_for_autocast(
    module: torch.nn.Module, autocast: torch.dtype | None, *, skip: tuple[torch.nn.Module, ...] = ()
) -> int:
    """Under bf16 autocast, cast the weights and biases of ``module``'s linear and
    convolution layers to bf16, in place; returns the number of bytes this frees.

    Autocast casts a float32 weight on every call: in a CUDA graph, whose casts cannot
    be cached, each step reads all weights in float32 and writes them again in bf16.
    Stored in bf16 they are read once and autocast leaves them alone, so each step gives
    bit for bit what it gave before, as long as the model only runs under that autocast.
    Not under fp16: NeMo's attention nests a bf16 autocast inside an fp16 one, which would
    then round weights through fp16 first. A parameter that another kind of module also
    holds (a tied embedding) is left alone: its other use would see it rounded. The
    submodules in ``skip`` keep their weights: parts that run outside autocast.
    """
    if autocast is not torch.bfloat16:
        return 0
    kept = {id(layer) for part in skip for layer in part.modules()}
    layers = [(layer, isinstance(layer, AUTOCAST_LAYERS) and id(layer) not in kept) for layer in module.modules()]
    owners: dict[int, list[bool]] = {}
    for layer, cast in layers:
        for parameter in layer._parameters.values():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(cast)
    freed = 0
    for layer, cast in layers:
        for key in ("weight", "bias") if cast else ():
            parameter = layer._parameters.get(key)
            if parameter is None or parameter.dtype != torch.float32 or not all(owners[id(parameter)]):
                continue
            parameter.data = parameter.data.to(autocast)
            freed += parameter.nbytes
    return freed
