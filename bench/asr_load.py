"""Load generator for the streaming ASR server: N concurrent real-time sessions.

Each session streams real speech in real time, as a voice agent's client would:
utterances of a few seconds, then the VAD's 200 ms of silence, then
``reset {trailing_silence_ms: 200}``, then the next utterance at once. Like
``NemotronSTTService`` it holds its ``--frame-ms`` frames until the server's next step
boundary and sends them as one message (``--unaligned`` sends every frame as it comes). Client processes
share the sessions so the load generator is not the bottleneck.

Reported per N:
- chunk latency p50/p90/p99: from a chunk's last byte reaching the server to the end of
  the step that transcribed it. Read from the server's ``asr_chunk_latency_seconds``
  histogram (difference over the run, interpolated within buckets; a value equal to the
  top finite bucket edge, 60 s, means "at least that").
- final latency p50/p90/p99: measured by the clients, from sending ``reset`` to
  receiving the final transcript.
- mean batch size and step time, errors.
- audio messages the server received per second of streaming and the server process's CPU
  use in cores (its ``process_cpu_seconds_total``, steps included): run the same load with
  and without ``--unaligned`` to see what per-frame messages cost it.
- how far behind real time the clients sent audio at worst (``client_send_late_ms_max``):
  a load generator that cannot keep up sends in bursts, and its load is not counted.
The largest N whose p99 chunk latency stays within the chunk period (160 ms at R = 1),
below the smallest that does not, is what one server sustains.

    python -m bench.asr_load --url ws://127.0.0.1:8080 --sessions 1 64 256 512 1024 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect

from bench.common import (
    SPEECH,
    connection_loss_as_error,
    delta,
    histogram_quantiles,
    largest_load_kept,
    percentiles_ms,
    run_clients,
    scrape,
    write_json,
)
from pipecat_nvidia.protocol import AsrReady, AsrTranscript, ErrorMessage, parse_asr_server_message
from pipecat_nvidia.step_audio import StepAlignedAudio

RATE = 16000
VAD_STOP_MS = 200
CLIENT_LATE_LIMIT_S = 0.1
"""A load whose clients sent audio later than this behind real time did not load the
server as it says (a late client sends in bursts): it is not within budget."""
FINAL_WAIT_S = 10.0
"""How long a session waits after its last reset for the finals still owed (a loaded
server's are the slowest; dropping them would flatter its final latency)."""


@dataclass(frozen=True)
class ClientShape:
    """How each simulated client streams."""

    seconds: float
    """How long each session streams."""
    frame_ms: float = 160.0
    """Audio per frame the client produces."""
    utterance_s: float = 3.0
    aligned: bool = True
    """Hold frames until the server's next step boundary, as ``NemotronSTTService`` does."""


@dataclass
class ClientResult:
    final_latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sessions_ready: int = 0
    send_late_s: float = 0.0
    """The most any session's audio went out behind real time."""
    streamed_s: float = 0.0
    """The most audio any session streamed: whole utterances, so past ``--duration``."""


async def _session(
    url: str,
    speech: np.ndarray,
    shape: ClientShape,
    rng: random.Random,
    result: ClientResult,
) -> None:
    resets_sent: list[float] = []
    with connection_loss_as_error(result.errors):
        await _stream(url, speech, shape, rng, result, resets_sent)
    # Every reset is owed a final: one that never came is an error, not a latency left out.
    result.errors.extend("no final" for _ in resets_sent)


async def _stream(
    url: str, speech: np.ndarray, shape: ClientShape, rng: random.Random, result: ClientResult, resets_sent: list
) -> None:
    frame = int(RATE * shape.frame_ms / 1000)
    utterance_samples = int(shape.utterance_s * RATE)
    silence = np.zeros(int(RATE * VAD_STOP_MS / 1000), np.int16)
    reset = json.dumps({"type": "reset", "finalize": True, "trailing_silence_ms": VAD_STOP_MS})
    async with connect(url, max_queue=None) as ws:
        ready = parse_asr_server_message(await ws.recv())
        if not isinstance(ready, AsrReady):
            result.errors.append("no ready")
            return
        result.sessions_ready += 1
        held = StepAlignedAudio.for_server(ready) if shape.aligned else None

        async def receive() -> None:
            async for raw in ws:
                message = parse_asr_server_message(raw)
                if isinstance(message, AsrTranscript) and message.is_final and resets_sent:
                    result.final_latencies.append(time.perf_counter() - resets_sent.pop(0))
                elif isinstance(message, ErrorMessage):
                    result.errors.append(message.code.value)

        receiver = asyncio.create_task(receive())
        await asyncio.sleep(rng.random() * shape.frame_ms / 1000)  # spread sessions over a frame
        start = time.perf_counter()
        sent = 0
        while time.perf_counter() - start < shape.seconds:
            offset = rng.randrange(0, len(speech) - utterance_samples)
            utterance = np.concatenate([speech[offset : offset + utterance_samples], silence])
            for i in range(0, len(utterance), frame):
                sent += frame
                behind = time.perf_counter() - (start + sent / RATE)
                result.send_late_s = max(result.send_late_s, behind)
                await asyncio.sleep(max(0.0, -behind))
                pcm = utterance[i : i + frame].tobytes()
                pcm = held.add(pcm) if held else pcm
                if pcm:
                    await ws.send(pcm)
            rest = held.end_utterance() if held else b""
            if rest:
                await ws.send(rest)
            resets_sent.append(time.perf_counter())
            await ws.send(reset)
        result.streamed_s = max(result.streamed_s, sent / RATE)
        deadline = time.perf_counter() + FINAL_WAIT_S
        while resets_sent and not receiver.done() and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)


def _client_process(sessions: int, seed: int, url: str, shape: ClientShape) -> dict:
    speech, rate = sf.read(SPEECH, dtype="int16")
    assert rate == RATE
    result = ClientResult()

    async def main() -> None:
        rng = random.Random(seed)
        await asyncio.gather(
            *(_session(url, speech, shape, random.Random(rng.random()), result) for _ in range(sessions)),
            return_exceptions=False,
        )

    asyncio.run(main())
    return result.__dict__


def run_load(url: str, sessions: int, shape: ClientShape, processes: int) -> dict:
    before = scrape(url)
    parts = run_clients(_client_process, sessions, processes, url, shape)
    after = scrape(url)
    finals = [x for p in parts for x in p["final_latencies"]]
    chunk = histogram_quantiles(before, after, "asr_chunk_latency_seconds")
    steps = delta(before, after, "asr_step_seconds_count")
    streamed_s = max(p["streamed_s"] for p in parts)
    return {
        "sessions": sessions,
        "sessions_ready": sum(p["sessions_ready"] for p in parts),
        "chunks": delta(before, after, "asr_chunk_latency_seconds_count"),
        "chunk_ms_p50_p90_p99": [None if v is None else round(1000 * v, 1) for v in chunk],
        "finals": len(finals),
        "final_ms_p50_p90_p99": percentiles_ms(finals),
        "mean_batch": round(delta(before, after, "asr_batch_size_sum") / steps, 1) if steps else None,
        "mean_step_ms": round(1000 * delta(before, after, "asr_step_seconds_sum") / steps, 2) if steps else None,
        # Per second of streaming, which every session did at once (the run's wall time
        # also holds starting the client processes and waiting for the last finals).
        "streamed_s": round(streamed_s, 2),
        "audio_messages_per_s": round(delta(before, after, "asr_audio_messages_total") / streamed_s, 1),
        "server_cpu_cores": round(delta(before, after, "process_cpu_seconds_total") / streamed_s, 3),
        "client_send_late_ms_max": round(1000 * max(p["send_late_s"] for p in parts), 1),
        "errors": sorted({e for p in parts for e in p["errors"]}),
        "error_count": sum(len(p["errors"]) for p in parts),
    }


def _within_budget(result: dict, budget_ms: float) -> bool:
    p99 = result["chunk_ms_p50_p90_p99"][2]
    return (
        p99 is not None
        and p99 <= budget_ms
        and result["sessions_ready"] == result["sessions"]
        and result["client_send_late_ms_max"] <= 1000 * CLIENT_LATE_LIMIT_S
        and not result["error_count"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8080")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each session streams")
    parser.add_argument("--frame-ms", type=float, default=160.0, help="audio per frame the client produces")
    parser.add_argument("--utterance-s", type=float, default=3.0)
    parser.add_argument("--unaligned", action="store_true", help="send every frame as it comes")
    parser.add_argument("--processes", type=int, default=max(1, min(8, multiprocessing.cpu_count() // 2)))
    parser.add_argument("--budget-ms", type=float, default=160.0, help="p99 chunk latency a load must keep")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results = []
    for n in args.sessions:
        shape = ClientShape(args.duration, args.frame_ms, args.utterance_s, aligned=not args.unaligned)
        result = run_load(args.url, n, shape, args.processes)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:  # after every load: a run cut short keeps the loads it finished
            write_json(args.json, _report(results, args.budget_ms))
    print(json.dumps({k: v for k, v in _report(results, args.budget_ms).items() if k != "runs"}), flush=True)


def _report(results: list[dict], budget_ms: float) -> dict:
    return {
        "runs": results,
        "largest_sessions_within_budget": largest_load_kept(results, lambda r: _within_budget(r, budget_ms)),
        "budget_ms": budget_ms,
    }


if __name__ == "__main__":
    main()
