"""What the load generators share: client processes and reading the server's metrics."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

SPEECH = Path(__file__).resolve().parents[1] / "tests" / "data" / "harvard_16k.wav"


def write_json(path: str | Path, data) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary file beside it, then
    ``os.replace``): the runners rewrite their results after every load, so a process killed
    at the device's time limit leaves the loads it finished, never a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def http_url(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://").replace("wss://", "https://").rstrip("/")


def scrape(ws_url: str) -> dict[str, dict]:
    """The server's metrics: sample name -> {bucket edge or None: value}."""
    with urllib.request.urlopen(f"{http_url(ws_url)}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[sample.labels.get("le")] = sample.value
    return samples


def delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, {}).get(None, 0.0) - before.get(name, {}).get(None, 0.0)


def histogram_quantiles(before: dict, after: dict, name: str, quantiles=(0.5, 0.9, 0.99)) -> list[float | None]:
    """Quantiles of a Prometheus histogram's observations between two scrapes (linear
    within buckets; a value equal to the top edge means "at least that")."""
    buckets = after.get(f"{name}_bucket", {})
    edges = sorted((float(le), count - before.get(f"{name}_bucket", {}).get(le, 0.0)) for le, count in buckets.items())
    total = edges[-1][1] if edges else 0.0
    if total <= 0:
        return [None for _ in quantiles]
    values = []
    for q in quantiles:
        target, lower, below = q * total, 0.0, 0.0
        for upper, cumulative in edges:
            if cumulative >= target:
                if upper == float("inf"):
                    values.append(lower)
                else:
                    inside = cumulative - below
                    values.append(lower + (upper - lower) * ((target - below) / inside if inside else 1.0))
                break
            lower, below = upper, cumulative
    return values


def percentiles_ms(seconds: list[float], qs=(50, 90, 99)) -> list[float] | None:
    return [round(1000 * float(np.percentile(seconds, q)), 1) for q in qs] if seconds else None


def largest_load_kept(results: list[dict], kept: Callable[[dict], bool]) -> int | None:
    """The most ``sessions`` of the loads below the smallest one that failed ``kept``: a
    noisy pass above a failure does not count."""
    largest = None
    for result in sorted(results, key=lambda r: r["sessions"]):
        if not kept(result):
            break
        largest = result["sessions"]
    return largest


@contextlib.contextmanager
def connection_loss_as_error(errors: list[str]) -> Iterator[None]:
    """A client session's connection dropped or refused by the server becomes that session's
    error, so that the load, and the loads after it, are still measured."""
    try:
        yield
    except (ConnectionClosed, OSError, TimeoutError) as e:
        errors.append(f"connection lost: {type(e).__name__}")


def run_clients(target: Callable[..., dict], sessions: int, processes: int, *args) -> list[dict]:
    """Run ``target(n, seed, *args)`` in ``processes`` client processes sharing ``sessions``."""
    processes = max(1, min(processes, sessions))
    shares = [sessions // processes + (1 if i < sessions % processes else 0) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.starmap(target, [(n, seed, *args) for seed, n in enumerate(shares) if n])
