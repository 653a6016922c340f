"""A function over fixed input buffers, replayed from a CUDA graph.

Eager PyTorch on a GPU pays a kernel launch (~5–70 µs of host time) per operation; a
small model's step is all launches. A graph launches a captured sequence at once, but only
over the same buffers and shapes: callers copy their inputs into ``inputs`` and read
the outputs before the next replay, which writes the same tensors again. A CPU has no
graphs, but tests must see what a GPU's replay would do: there the call is recorded as its
list of operations and replayed over the same tensors. What the function read from Python
at capture (a counter, a length, a tensor it looked up) stays fixed, as in a graph; a read
back from the device, or a copy of Python data to it, fails the capture, as on a GPU; and
the warm-up runs a capture makes write to the buffers they are given, as a GPU's do.

While a capture is under way no other thread in the process may draw random numbers on
the GPU (its generator is being recorded): capture before serving.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from loguru import logger
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map


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


HOST_READS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim"})
"""Operations that wait for the device and read a value back: no CUDA graph can hold one,
and a capture that meets one fails."""

HOST_UPLOADS = frozenset({"aten::lift_fresh"})
"""Operations that turn Python data into a tensor (``torch.tensor(list)``, indexing with a
list): on a GPU that is a copy from pageable host memory, which waits for the stream and so
fails a capture."""


class FixedCall:
    def __init__(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], pool):
        """Captures ``fn`` over ``inputs`` (on a GPU, into ``pool`` from ``graph_pool``);
        each call then replays it and returns the same output tensors."""
        self.inputs = inputs
        if inputs[0].device.type == "cuda":
            self._replay, self._outputs = _capture(fn, inputs, pool)
        else:
            self._replay, self._outputs = _record(fn, inputs)

    def __call__(self) -> Any:
        self._replay()
        return self._outputs


def _capture(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], pool) -> tuple[Callable[[], None], Any]:
    device = inputs[0].device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):  # kernels chosen, workspaces and lazy buffers allocated
            fn(*inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream(device)
    try:
        # thread_local: other threads (other engines in the process) may use the GPU meanwhile.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = fn(*inputs)
    except BaseException:
        # A capture that fails in its end leaves the capture stream current: the eager
        # fallback would run on it.
        torch.cuda.set_stream(stream)
        raise
    return graph.replay, outputs


def _record(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> tuple[Callable[[], None], Any]:
    """A GPU capture's CPU stand-in: as many runs of ``fn`` as the capture's warm-up makes,
    the last one recorded. A replay runs the recorded operations again, each on the tensors
    that the replay's earlier ones made in place of the recording's (tensors from before
    the capture, such as its inputs, are used as they are), and writes the results into the
    recorded outputs, as a graph's replay writes into its captured ones."""
    fn(*inputs)
    with _Recording() as recording:
        outputs = fn(*inputs)
    operations = recording.operations
    recorded_outputs = _tensors(outputs)

    def replay() -> None:
        made: dict[int, torch.Tensor] = {}

        def now(leaf: Any) -> Any:
            return made.get(id(leaf), leaf) if isinstance(leaf, torch.Tensor) else leaf

        with torch.inference_mode():
            for op, args, kwargs, recorded in operations:
                results = op(*tree_map(now, args), **tree_map(now, kwargs))
                made.update(zip(map(id, recorded), _tensors(results), strict=True))
            for output in recorded_outputs:
                result = now(output)
                if result.untyped_storage().data_ptr() != output.untyped_storage().data_ptr():
                    output.copy_(result)

    return replay, outputs


class _Recording(TorchDispatchMode):
    """Each operation a call runs, with its arguments and the tensors it made."""

    def __init__(self):
        super().__init__()
        self.operations: list[tuple[Any, tuple, dict, list[torch.Tensor]]] = []

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if op.name() in HOST_READS:
            raise RuntimeError(f"{op.name()} reads a value back from the device: a CUDA graph cannot hold it")
        if op.name() in HOST_UPLOADS:
            raise RuntimeError(f"{op.name()} copies Python data to the device: a CUDA graph cannot hold it")
        result = op(*args, **kwargs)
        self.operations.append((op, args, kwargs, _tensors(result)))
        return result


def _tensors(result: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(result) if isinstance(leaf, torch.Tensor)]


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
