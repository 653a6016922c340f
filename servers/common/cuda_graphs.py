"""A function over fixed input buffers, replayed from a CUDA graph.

Eager PyTorch on a GPU pays a kernel launch (~5–70 µs of host time) per operation; a
small model's step is all launches. A graph launches a captured sequence at once, but only
over the same buffers and shapes: callers copy their inputs into ``inputs`` and read
the outputs before the next replay, which writes the same tensors again. A CPU has no
graphs, but tests must see what a GPU's replay would do: there the call is recorded as its
list of operations and replayed over the same tensors. What the function read from Python
at capture (a counter, a length, a tensor it looked up) stays fixed, as in a graph; a read
back from the device, or a copy of host data to it, fails the capture, as on a GPU; and
the warm-up runs a capture makes write to the buffers they are given, as a GPU's do.

While a capture is under way no other thread in the process may replay a graph or draw
random numbers on the GPU (PyTorch's default generator is in capture mode for the whole
process): capture holding ``servers.common.loading.EXCLUSIVE_GPU_WORK``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from loguru import logger
from torch.utils._python_dispatch import TorchDispatchMode, autograd_would_have_decomposed
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


class GraphPool(NamedTuple):
    """Memory that a family of captures shares, and the one stream they warm up and are
    captured on. cuBLAS keeps a workspace per stream that every graph captured on it uses:
    warmed up on that stream it is allocated outside any graph, and no family's graphs use
    another's (while the process makes fewer streams than PyTorch's pool of 32), so
    dropping a family (PyTorch may free its stream's workspace then) spares the others."""

    handle: Any
    stream: torch.cuda.Stream


def graph_pool(device: torch.device) -> GraphPool | None:
    """A pool for one family of captures on ``device`` (None on a CPU)."""
    if device.type != "cuda":
        return None
    return GraphPool(torch.cuda.graph_pool_handle(), torch.cuda.Stream(device))


HOST_READS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::masked_select",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::unique_dim_consecutive",
        "aten::equal",
        "aten::allclose",
        "aten::multinomial",
        "aten::bincount",
        "aten::histc",
    }
)
"""Operations that wait for the device and read a value back (a value, or a result's size
that depends on values): no CUDA graph can hold one, and a capture that meets one fails.
Operations made of others (``item``, ``where(condition)``) are checked by their parts."""

BOOLEAN_INDEXING = frozenset({"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
"""Indexing that, given a boolean mask, finds its ``nonzero`` positions first."""

CHECKED_WHOLE = frozenset({"aten::one_hot"})
"""Operations made of others that are checked as one: on a CPU ``one_hot`` reads its values
back to validate them, which on a GPU it does not."""

HOST_UPLOADS = frozenset({"aten::lift_fresh"})
"""Operations that turn Python data into a tensor (``torch.tensor(list)``, indexing with a
list): copied to a GPU, it comes from pageable host memory, a copy that waits for the stream
and so fails a capture."""


class FixedCall:
    def __init__(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], pool: GraphPool | None):
        """Captures ``fn`` over ``inputs`` (on a GPU, in ``pool`` from ``graph_pool``);
        each call then replays it and returns the same output tensors."""
        self.inputs = inputs
        if inputs[0].device.type == "cuda":
            self._replay, self._outputs = _capture(fn, inputs, pool)
        else:
            self._replay, self._outputs = _record(fn, inputs)

    def __call__(self) -> Any:
        self._replay()
        return self._outputs


def _capture(
    fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], pool: GraphPool
) -> tuple[Callable[[], None], Any]:
    """Two warm-up runs (kernels chosen, workspaces and lazy buffers allocated), the second
    checked for what would fail the capture: a capture that fails leaves PyTorch's random
    generator in capture mode on some versions, and every random draw after it failing."""
    device = inputs[0].device
    pool.stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(pool.stream):
        fn(*inputs)
        with _CaptureCheck(device):
            fn(*inputs)
    torch.cuda.current_stream(device).wait_stream(pool.stream)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream(device)
    try:
        # thread_local: other threads (engines' I/O, the LLM) may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=pool.handle, stream=pool.stream, capture_error_mode="thread_local"):
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
    recorded outputs, as a graph's replay writes into its captured ones. The recording's
    own tensors are not kept."""
    fn(*inputs)
    with _Recording(inputs[0].device) as recording:
        outputs = fn(*inputs)
        written = [(output, index) for output in _tensors(outputs) if (index := recording.index(output)) is not None]
    operations, slots = recording.operations, recording.slots

    def replay() -> None:
        made: list[torch.Tensor | None] = [None] * slots

        def now(leaf: Any) -> Any:
            return made[leaf.index] if isinstance(leaf, _Made) else leaf

        with torch.inference_mode():
            for op, args, kwargs, results in operations:
                tensors = _tensors(op(*tree_map(now, args), **tree_map(now, kwargs)))
                for index, tensor in zip(results, tensors, strict=True):
                    made[index] = tensor
            for output, index in written:
                result = made[index]
                if result.untyped_storage().data_ptr() != output.untyped_storage().data_ptr():
                    output.copy_(result)

    return replay, outputs


class _CaptureCheck(TorchDispatchMode):
    """Fails at the first operation of a call on ``device`` that a CUDA graph cannot hold:
    a read back from the device (a value, or a copy to the host), or a copy of host data
    to it."""

    def __init__(self, device: torch.device):
        super().__init__()
        self._device = device

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if op._schema.name not in CHECKED_WHOLE and autograd_would_have_decomposed(op, tree_leaves((args, kwargs))):
            # Inference mode skips autograd, which runs such an op as the operations it is
            # made of: a read among them would pass unseen. Run them here, each checked.
            with self:
                result = op.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        result = op(*args, **kwargs)
        self._check(op, (args, kwargs), result)
        return result

    def _check(self, op, arguments: Any, result: Any) -> None:
        name, given = op.name(), _tensors(arguments)
        if self._device.type == "cpu":
            # Nothing tells the tensors meant for a device from those that stay on the host:
            # every read, and every tensor made from Python data, counts.
            reads, uploads = _reads_back(op, *arguments), op._schema.name in HOST_UPLOADS
        else:
            made = _tensors(result)
            reads = (_reads_back(op, *arguments) or any(t.device.type == "cpu" for t in made)) and any(
                t.device.type == self._device.type for t in given
            )
            uploads = any(t.device.type == "cpu" and t.dim() > 0 for t in given) and any(
                t.device.type == self._device.type for t in given + made
            )
        if reads:
            raise RuntimeError(f"{name} reads a value back from the device: a CUDA graph cannot hold it")
        if uploads:
            raise RuntimeError(f"{name} copies host data to the device: a CUDA graph cannot hold it")


def _reads_back(op, args: tuple, kwargs: dict) -> bool:
    """Whether ``op`` over these arguments waits for the device to read a value back."""
    name = op._schema.name
    if name in HOST_READS:
        return True
    if name in BOOLEAN_INDEXING:
        indices = kwargs.get("indices", args[1] if len(args) > 1 else ())
        masks = any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
        return masks and (name == "aten::index" or not _fills_a_mask(args, kwargs))
    if name == "aten::repeat_interleave":  # repeats given as a tensor: the output's size is their sum
        return kwargs.get("output_size") is None
    if name == "aten::one_hot":  # without a number of classes: the largest value's, read back
        return (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1
    return False


def _fills_a_mask(args: tuple, kwargs: dict) -> bool:
    """``x[mask] = value`` with one mask on ``x``'s device and one value held on the host:
    ATen fills the mask in place (``masked_fill_``) without finding its positions."""
    target, indices = args[0], [i for i in kwargs.get("indices", args[1]) if i is not None]
    values = kwargs.get("values", args[2] if len(args) > 2 else None)
    accumulate = kwargs.get("accumulate", args[3] if len(args) > 3 else False)
    return (
        not accumulate
        and len(indices) == 1
        and indices[0].device == target.device
        and values.numel() == 1
        and values.device.type == "cpu"
    )


class _Made:
    """A tensor that the recorded call made, by its index among them."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Recording(_CaptureCheck):
    """Each operation a call runs, with its arguments, the tensors the call made standing as
    ``_Made`` indices. The recording holds those tensors (so that no two share an ``id``);
    the operations do not."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.operations: list[tuple[Any, tuple, dict, list[int]]] = []
        self._made: dict[int, tuple[int, torch.Tensor]] = {}

    @property
    def slots(self) -> int:
        return len(self._made)

    def index(self, tensor: torch.Tensor) -> int | None:
        """Where the call made ``tensor``; None if it came from outside."""
        entry = self._made.get(id(tensor))
        return None if entry is None else entry[0]

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        result = super().__torch_dispatch__(op, types, args, kwargs)
        args, kwargs = tree_map(self._as_made, (args, kwargs or {}))
        self.operations.append((op, args, kwargs, [self._keep(tensor) for tensor in _tensors(result)]))
        return result

    def _as_made(self, leaf: Any) -> Any:
        index = self.index(leaf) if isinstance(leaf, torch.Tensor) else None
        return leaf if index is None else _Made(index)

    def _keep(self, tensor: torch.Tensor) -> int:
        index = self.index(tensor)
        if index is None:
            index = len(self._made)
            self._made[id(tensor)] = (index, tensor)
        return index


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

    def find(self, key) -> FixedCall | None:
        """``get``, but a capture that fails is logged and leaves no bucket: None."""
        try:
            return self.get(key)
        except Exception:  # noqa: BLE001 - serving eagerly beats not serving
            logger.exception(f"{self._what} could not be captured as CUDA graphs; it runs eagerly")
            self._calls.clear()
            return None

    def clear(self) -> None:
        self._calls.clear()

    def prepare(self, keys: list) -> bool:
        """Capture a bucket for every key (largest first, see ``buckets_up_to``), afresh;
        False, with the error logged and no bucket left, if one fails."""
        self._calls.clear()
        if any(self.find(key) is None for key in keys):
            return False
        logger.info(f"{self._what}: {len(self._calls)} shapes ready as CUDA graphs")
        return True
