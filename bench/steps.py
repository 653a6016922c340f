"""What the in-process step benchmarks share: a sweep over batch sizes, optionally under
the torch profiler, each result a JSON line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch

from bench.common import write_json


class profiled:
    """torch.profiler over one batch's steps; op tables by host and by GPU time on exit."""

    def __init__(self, folder: Path, batch: int):
        self._path = folder / f"steps_{batch}.txt"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities)

    def __enter__(self):
        self._profiler.__enter__()

    def __exit__(self, *exc) -> None:
        self._profiler.__exit__(*exc)
        averages = self._profiler.key_averages()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._path.write_text(
            "\n\n".join(
                averages.table(sort_by=key, row_limit=40) for key in ("self_cpu_time_total", "self_device_time_total")
            )
        )


def sweep(
    batches: Iterable[int], measure: Callable[[int], dict], json_path: str | None, profile: Path | None
) -> list[dict]:
    """``measure(batch)`` for each batch size (profiled into ``profile`` if given), each
    result printed as it comes; ``json_path``, if given, is rewritten after each batch with
    those done so far, so a run stopped by a hang (the benchmarks' faulthandler timeout) or
    by a time limit keeps them."""
    results = []
    for batch in batches:
        with profiled(profile, batch) if profile else nullcontext():
            result = measure(batch)
        results.append(result)
        print(json.dumps(result), flush=True)
        if json_path:
            write_json(json_path, results)
    return results
