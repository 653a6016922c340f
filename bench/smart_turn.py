"""Smart Turn v3's time per end of speech on this machine's CPU, by thread count.

When the VAD reports the end of speech, the agent waits for Smart Turn's verdict before
the LLM starts: its inference is part of every reply's latency. Pipecat runs it on one
thread by default; ``BOT_TURN_CPUS`` gives it more. This measures what they buy here,
through Pipecat's own analyzer (20 ms frames of read speech, then its end-of-turn
analysis), one sentence of ``tests/data/harvard_16k.wav`` per turn.

    python -m bench.smart_turn --cpus 1 2 4 8 --turns 20 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import soundfile as sf
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3

from bench.common import SPEECH, percentiles_ms, write_json
from bench.conversation import FRAME, RATE, sentences


async def turn_times(cpus: int, turns: list[np.ndarray]) -> list[float]:
    """Seconds of Smart Turn's analysis for each turn (after one unmeasured warm-up turn)."""
    analyzer = LocalSmartTurnAnalyzerV3(cpu_count=cpus)
    analyzer.set_sample_rate(RATE)
    times = []
    try:
        for speech in [turns[0], *turns]:
            for start in range(0, len(speech) - FRAME + 1, FRAME):
                analyzer.append_audio(speech[start : start + FRAME].tobytes(), is_speech=True)
            _, metrics = await analyzer.analyze_end_of_turn()
            analyzer.clear()
            times.append(metrics.e2e_processing_time_ms / 1000)
    finally:
        await analyzer.cleanup()
    return times[1:]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--json")
    a = p.parse_args(argv)
    speech, _ = sf.read(SPEECH, dtype="int16")
    said = sentences(speech)
    turns = [said[i % len(said)] for i in range(a.turns)]
    results = {}
    for cpus in a.cpus:
        p50, p90 = percentiles_ms(asyncio.run(turn_times(cpus, turns)), (50, 90))
        results[str(cpus)] = {"turns": len(turns), "p50_ms": p50, "p90_ms": p90}
        print(f"{cpus} thread(s): Smart Turn p50 {p50:.1f} ms, p90 {p90:.1f} ms over {len(turns)} turns", flush=True)
    if a.json:
        write_json(a.json, results)
    else:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
