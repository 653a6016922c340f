"""Per-session streaming state kept as rows ("slots") of shared tensors.

A batched step gathers the rows of the sessions it runs with one ``index_select`` per
tensor and scatters the new state back with one ``index_copy_``: the cost does not
depend on how many sessions exist, and the tensors keep fixed addresses between
growths. A pool made at its full size never grows, so a CUDA graph may gather from and
scatter to it directly; row 0 is then where the graph's padding rows read and write.
Memory per session is fixed.

A step gathers and scatters while other threads open sessions, which may grow the pool;
one lock keeps a scatter from landing in tensors that a growth has already copied away.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from servers.common.engine import EngineFull

SCRATCH_SLOT = 0
"""A row of every tensor that no session owns: padding rows of fixed-size steps use it."""


@dataclass(frozen=True)
class PooledTensor:
    """One state tensor: its initial value for a single session and its batch dimension."""

    initial: torch.Tensor
    batch_dim: int


class StatePool:
    """Named state tensors with one slot per session, growing by doubling up to a limit."""

    def __init__(self, layout: dict[str, PooledTensor], capacity: int, max_capacity: int):
        self._layout = layout
        self._device = next(iter(layout.values())).initial.device
        self._max_capacity = max_capacity
        self._capacity = 0
        self._tensors: dict[str, torch.Tensor] = {}
        self._free: list[int] = []
        self._lock = threading.Lock()
        self._grow(min(capacity, max_capacity))

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def fixed(self) -> bool:
        """The pool is at its largest: its tensors never move."""
        return self._capacity == self._max_capacity

    @property
    def in_use(self) -> int:
        return self._capacity - len(self._free)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    def batch_dim(self, name: str) -> int:
        return self._layout[name].batch_dim

    def _grow(self, capacity: int) -> None:
        for name, spec in self._layout.items():
            sizes = [1] * spec.initial.dim()
            sizes[spec.batch_dim] = 1 + capacity
            grown = spec.initial.repeat(*sizes)
            if name in self._tensors:
                grown.narrow(spec.batch_dim, 0, 1 + self._capacity).copy_(self._tensors[name])
            self._tensors[name] = grown
        self._free.extend(reversed(range(1 + self._capacity, 1 + capacity)))
        self._capacity = capacity

    def acquire(self) -> int:
        """A free slot, holding what its last session left (a new one, the initial state):
        ``reset`` it before its first step. Not here: a write to a GPU tensor from the
        thread that opens sessions would wait for the step running on the GPU."""
        with self._lock:
            if not self._free:
                if self.fixed:
                    # Sessions closed during a step hold their slots until it ends.
                    raise EngineFull(f"all {self._max_capacity} session slots are in use")
                self._grow(min(2 * self._capacity, self._max_capacity))
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def reset(self, slots: Sequence[int]) -> None:
        """Put ``slots`` back to the initial state: one write per tensor however many
        (at hundreds of streams a step ends dozens of utterances)."""
        if slots:
            with self._lock:
                self._reset(slots)

    def _reset(self, slots: Sequence[int]) -> None:
        index = torch.tensor(slots, device=self._device)
        for name, spec in self._layout.items():
            sizes = list(spec.initial.shape)
            sizes[spec.batch_dim] = len(slots)
            self._tensors[name].index_copy_(spec.batch_dim, index, spec.initial.expand(sizes))

    def gather(self, slots: torch.Tensor, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The rows of ``slots`` of the tensors ``names`` (default: all)."""
        with self._lock:
            return {
                name: self._tensors[name].index_select(self._layout[name].batch_dim, slots)
                for name in (self._layout if names is None else names)
            }

    def scatter(self, slots: torch.Tensor, values: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> None:
        """Write ``values`` back to ``slots``; with ``rows``, only those rows of ``values``
        (``slots`` then lists the slots of those rows alone)."""
        with self._lock:
            for name, value in values.items():
                dim = self._layout[name].batch_dim
                if rows is not None:
                    value = value.index_select(dim, rows)
                target = self._tensors[name]
                target.index_copy_(dim, slots, value.to(target.dtype))
