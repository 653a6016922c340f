"""A function over fixed input buffers, replayed from a CUDA graph.

Eager PyTorch on a GPU pays a kernel launch (~5–70 µs of host time) per operation; a
small model's step is all launches. A graph launches a captured sequence at once, but only
over the same buffers and shapes: callers copy their inputs into ``inputs`` and read
the outputs before the next replay, which writes the same tensors again. On a CPU nothing
is captured: the function runs eagerly on the same buffers and its results are copied into
the first call's outputs, so tests check everything but the capture, a caller that keeps
an output past the next call included.

While a capture is under way no other thread in the process may draw random numbers on
the GPU (its generator is being recorded): capture before serving.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from loguru import logger


def bucket_rows(rows: int) -> int:
    """The graph a batch of ``rows`` replays: the power of two that holds it (few graphs,
    none more than twice the work)."""
    return 1 << (rows - 1).bit_length()


def buckets_up_to(max_rows: int) -> list[int]:
    """Every bucket a batch of up to ``max_rows`` may need, largest first: the memory a
    capture frees stays in the shared pool, where each smaller capture after it fits."""
    return sorted({bucket_rows(n) for n in range(1, max_rows + 1)}, reverse=True)


def graph_max_batch(model, limit: int) -> int:
    """``limit`` for a model on CUDA; 0 (eager) elsewhere, where there is nothing to capture."""
    return limit if next(model.parameters()).device.type == "cuda" else 0


def graph_pool(device: torch.device):
    """A memory pool that captures on ``device`` can share (None on a CPU)."""
    return torch.cuda.graph_pool_handle() if device.type == "cuda" else None


class FixedCall:
    def __init__(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], pool):
        """``pool``: from ``graph_pool``; None runs ``fn`` eagerly at every call."""
        self.inputs = inputs
        self._fn = fn
        self._graph: torch.cuda.CUDAGraph | None = None
        self._outputs: Any = None
        if pool is not None:
            self._capture(pool)

    def __call__(self) -> Any:
        if self._graph is not None:
            self._graph.replay()
        elif self._outputs is None:
            self._outputs = self._fn(*self.inputs)
        else:
            _copy_into(self._outputs, self._fn(*self.inputs))
        return self._outputs

    def _capture(self, pool) -> None:
        device = self.inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # kernels chosen, workspaces and lazy buffers allocated
                self._fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(device)
        try:
            # thread_local: other threads (other engines in the process) may use the GPU meanwhile.
            with torch.cuda.graph(self._graph, pool=pool, capture_error_mode="thread_local"):
                self._outputs = self._fn(*self.inputs)
        except BaseException:
            # A capture that fails in its end leaves the capture stream current: the eager
            # fallback would run on it.
            torch.cuda.set_stream(stream)
            raise


def _copy_into(outputs: Any, results: Any) -> None:
    """Write a call's ``results`` into the first call's ``outputs`` (tensors, or tuples of
    them and None), as a replay writes into its captured outputs."""
    if isinstance(outputs, torch.Tensor):
        outputs.copy_(results)
    elif isinstance(outputs, tuple | list):
        for output, result in zip(outputs, results, strict=True):
            _copy_into(output, result)
    elif outputs is not None or results is not None:
        raise TypeError(f"a graphed function returned {type(results).__name__}: only tensors, tuples or None")


class GraphBuckets:
    """``FixedCall``s by shape key, made on first use or all at once before serving; if a
    capture fails the caller is told, and runs eagerly rather than not at all."""

    def __init__(self, what: str, make: Callable[[Any], FixedCall]):
        """``what`` names the work in logs; ``make(key)`` builds (and captures) one bucket."""
        self._what = what
        self._make = make
        self._calls: dict[Any, FixedCall] = {}

    @property
    def captured(self) -> list:
        return sorted(self._calls)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def get(self, key) -> FixedCall:
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = self._make(key)
        return call

    def clear(self) -> None:
        self._calls.clear()

    def prepare(self, keys: list) -> bool:
        """Capture a bucket for every key (largest first, see ``buckets_up_to``), afresh;
        False, with the error logged and no bucket left, if one fails."""
        self._calls.clear()
        try:
            for key in keys:
                self.get(key)
        except Exception:  # noqa: BLE001 - serving eagerly beats not serving
            logger.exception(f"{self._what} could not be captured as CUDA graphs; it runs eagerly")
            self._calls.clear()
            return False
        logger.info(f"{self._what}: {len(self._calls)} shapes ready as CUDA graphs")
        return True
