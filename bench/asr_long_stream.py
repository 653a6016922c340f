"""ASR step time over one long continuous stream, minute by minute, in process.

One session streams real speech (looped) in chunk-sized pieces and the engine steps after
each, so every step is one streaming chunk of the same utterance, hours long if asked.
Features are computed per chunk and the encoder's state is a fixed-size cache, so the
step in the last minute should cost what it did in the first; a cost that grows with the
utterance (re-running the preprocessor over everything so far) shows as a rising ratio.

    python -m bench.asr_long_stream --model model.nemo --device cpu --minutes 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import soundfile as sf

from bench.common import SPEECH
from servers.asr.config import AsrServerSettings
from servers.asr.server import load_engine


def step_times_by_minute(engine, minutes: int) -> list[list[float]]:
    """Seconds of each step, grouped by the minute of audio it transcribed."""
    rate = engine.geometry.sample_rate
    piece = engine.geometry.step_samples
    speech, _ = sf.read(SPEECH, dtype="int16")
    audio = np.tile(speech, -(-minutes * 60 * rate // len(speech)))[: minutes * 60 * rate]
    sid = engine.open_session(lambda message: None)
    by_minute: list[list[float]] = [[] for _ in range(minutes)]
    for start in range(0, len(audio), piece):
        engine.push_audio(sid, audio[start : start + piece].tobytes())
        by_minute[start // (60 * rate)] += [stats.seconds for stats in engine.run_until_idle()]
    engine.close_session(sid)
    return by_minute


def summary(by_minute: list[list[float]]) -> dict:
    medians = [1000 * statistics.median(times) for times in by_minute]
    return {
        "minutes": len(by_minute),
        "steps": sum(map(len, by_minute)),
        "step_ms_p50_by_minute": [round(m, 3) for m in medians],
        "last_over_first": round(medians[-1] / medians[0], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--right-context", type=int, default=1)
    p.add_argument("--minutes", type=int, default=10)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    settings = AsrServerSettings(model=a.model, device=a.device, right_context=a.right_context, max_sessions=1)
    result = summary(step_times_by_minute(load_engine(settings), a.minutes))
    print(json.dumps(result), flush=True)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
