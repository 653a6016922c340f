"""Load generator for the Magpie TTS server: N concurrent sessions speaking bot turns.

Each session speaks turns of three sentences, as a voice agent's TTS service does: all
three segments and a flush sent at once, the first segment streamed or batched (turns
alternate, so both are measured in the same run) and the others batched. The client plays
each turn out in real time from its first audio: a turn *underruns* if an audio message
arrives after the audio already received would have finished playing.

Reported per N:
- first audio p50/p90 for a streamed and for a batched first segment (client-measured,
  from sending ``speak`` to the first ``audio``);
- underrun turns (fraction), turns, errors;
- the server's real-time factor p50/p90 (step time over the audio a step adds to each
  segment) and mean batch size.
The largest N without underruns is what one server sustains in real time.

    python -m bench.tts_load --url ws://127.0.0.1:8001 --sessions 1 8 32 64 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import connect

from bench.common import (
    connection_loss_as_error,
    delta,
    histogram_quantiles,
    largest_load_kept,
    percentiles_ms,
    run_clients,
    scrape,
    write_json,
)
from pipecat_nvidia.protocol import ErrorMessage, TtsAudio, TtsDone, TtsReady, parse_tts_server_message

SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
)


@dataclass
class ClientResult:
    first_audio: dict[str, list[float]] = field(default_factory=lambda: {"stream": [], "batch": []})
    turns: int = 0
    underruns: int = 0
    errors: list[str] = field(default_factory=list)


async def _turn(ws, first_mode: str, sentences: list[str], result: ClientResult) -> bool:
    """Speak one turn and play it out; False if the server closed the connection first."""
    context = uuid.uuid4().hex
    sent = time.perf_counter()
    for i, text in enumerate(sentences):
        mode = first_mode if i == 0 else "batch"
        await ws.send(json.dumps({"type": "speak", "context_id": context, "text": text, "mode": mode}))
    await ws.send(json.dumps({"type": "flush", "context_id": context}))
    playout_start, buffered, underrun, done = None, 0.0, False, False
    async for raw in ws:
        message = parse_tts_server_message(raw)
        now = time.perf_counter()
        if isinstance(message, TtsAudio) and message.context_id == context:
            if playout_start is None:
                playout_start = now
                result.first_audio[first_mode].append(now - sent)
            elif now - playout_start > buffered:
                underrun = True
            buffered += len(message.pcm) / 2 / message.sample_rate
        elif isinstance(message, ErrorMessage):
            result.errors.append(message.code.value)
        elif isinstance(message, TtsDone) and message.context_id == context:
            done = True
            break
    if done:
        result.turns += 1
        result.underruns += underrun
    return done


async def _session(url: str, seconds: float, seed: int, result: ClientResult) -> None:
    with connection_loss_as_error(result.errors):
        await _speak_turns(url, seconds, seed, result)


async def _speak_turns(url: str, seconds: float, seed: int, result: ClientResult) -> None:
    async with connect(url, max_queue=None) as ws:
        if not isinstance(parse_tts_server_message(await ws.recv()), TtsReady):
            result.errors.append("no ready")
            return
        await asyncio.sleep((seed % 10) * 0.1)  # spread the sessions' turns
        start = time.perf_counter()
        modes = itertools.cycle(("stream", "batch") if seed % 2 == 0 else ("batch", "stream"))
        rotation = itertools.count(seed)
        while time.perf_counter() - start < seconds:
            k = next(rotation)
            sentences = [SENTENCES[(k + i) % len(SENTENCES)] for i in range(3)]
            if not await _turn(ws, next(modes), sentences, result):
                result.errors.append("connection closed mid-turn")
                return


def _client_process(sessions: int, seed: int, url: str, seconds: float) -> dict:
    result = ClientResult()

    async def main() -> None:
        await asyncio.gather(*(_session(url, seconds, seed * 1000 + i, result) for i in range(sessions)))

    asyncio.run(main())
    return result.__dict__


def run_load(url: str, sessions: int, seconds: float, processes: int) -> dict:
    before = scrape(url)
    parts = run_clients(_client_process, sessions, processes, url, seconds)
    after = scrape(url)
    steps = delta(before, after, "tts_step_seconds_count")
    turns = sum(p["turns"] for p in parts)
    rtf = histogram_quantiles(before, after, "tts_realtime_factor", (0.5, 0.9))
    first_audio = {mode: [x for p in parts for x in p["first_audio"][mode]] for mode in ("stream", "batch")}
    return {
        "sessions": sessions,
        "turns": turns,
        "first_audio_stream_ms_p50_p90": percentiles_ms(first_audio["stream"], (50, 90)),
        "first_audio_batch_ms_p50_p90": percentiles_ms(first_audio["batch"], (50, 90)),
        # How many turns each pair of percentiles is read from (a p90 of two is their larger).
        "first_audio_turns_stream_batch": [len(first_audio["stream"]), len(first_audio["batch"])],
        "underrun_turns": round(sum(p["underruns"] for p in parts) / turns, 3) if turns else None,
        "realtime_factor_p50_p90": [None if v is None else round(v, 3) for v in rtf],
        "mean_batch": round(delta(before, after, "tts_batch_size_sum") / steps, 1) if steps else None,
        "mean_step_ms": round(1000 * delta(before, after, "tts_step_seconds_sum") / steps, 2) if steps else None,
        "errors": sorted({e for p in parts for e in p["errors"]}),
        "error_count": sum(len(p["errors"]) for p in parts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8001")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds each session keeps starting turns")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results = []
    for n in args.sessions:
        result = run_load(args.url, n, args.duration, args.processes)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:  # after every load: a run cut short keeps the loads it finished
            write_json(args.json, _report(results))
    print(json.dumps({k: v for k, v in _report(results).items() if k != "runs"}), flush=True)


def _report(results: list[dict]) -> dict:
    def kept(r: dict) -> bool:
        return bool(r["turns"]) and r["underrun_turns"] == 0 and not r["error_count"]

    return {"runs": results, "largest_sessions_without_underrun": largest_load_kept(results, kept)}


if __name__ == "__main__":
    main()
