"""TTS engine decoder-step time against batch size and position, in process (no WebSocket).

For each batch size B, B sessions each speak the same long sentence in batch mode and the
engine steps (on this thread, which the profiler sees) until all are done. The steps that
carried all B segments and decoded no audio are pure decoder steps; their median at the
start and at the end of the segments shows whether a step's cost grows with the length
of what was already spoken (it must not: the decoder keeps a key/value cache). Random
weights never end speech, so ``--max-frames-per-token`` sets the segment length.

    python -m bench.tts_steps --model magpie.nemo --device cuda --batches 1 4 16 --json out.json
    python -m bench.tts_steps --model magpie.nemo --batches 16 --profile prof/   # where a step goes
"""

from __future__ import annotations

import argparse
import faulthandler
import statistics
import sys
import time
from pathlib import Path

from bench.steps import sweep
from pipecat_nvidia.protocol import TtsSpeak
from servers.common.settings import PRECISIONS
from servers.tts.config import TtsServerSettings
from servers.tts.engine import TtsStepStats
from servers.tts.server import load_engine

TEXT = (
    "The quick brown fox jumps over the lazy dog, and then it runs all the way back home "
    "before the sun goes down behind the hills."
)


def decoder_steps(engine, batch: int, text: str, timeout_s: float) -> list[TtsStepStats]:
    """The steps, in order, that advanced all ``batch`` segments and decoded no audio."""
    sids = [engine.open_session(lambda message: None) for _ in range(batch)]
    for sid in sids:
        engine.speak(sid, TtsSpeak(context_id="bench", text=text, mode="batch"))
        engine.flush(sid, "bench")
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    stats = engine.run_until_idle()
    faulthandler.cancel_dump_traceback_later()
    for sid in sids:
        engine.close_session(sid)
    return [s for s in stats if s.batch_size == batch and not s.started and not s.audio_seconds]


def median_ms(seconds: list[float]) -> float | None:
    return round(1000 * statistics.median(seconds), 2) if seconds else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="as the server's --precision")
    p.add_argument("--max-frames-per-token", type=float, default=1.5, help="segment length (random weights)")
    p.add_argument("--cuda-graph-max-batch", type=int, default=TtsServerSettings.cuda_graph_max_batch)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--json", default=None)
    p.add_argument("--profile", type=Path, help="write each batch's torch.profiler op tables (host and GPU) here")
    a = p.parse_args()
    started = time.monotonic()
    settings = TtsServerSettings(
        model=a.model,
        device=a.device,
        precision=a.precision,
        max_sessions=max(a.batches),
        max_batch=max(a.batches),
        max_frames_per_token=a.max_frames_per_token,
        cuda_graph_max_batch=a.cuda_graph_max_batch,
    )
    engine = load_engine(settings)
    print(f"loaded and warmed up in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)

    def measure(batch: int) -> dict:
        steps = decoder_steps(engine, batch, TEXT, a.timeout_s)
        times = [s.seconds for s in steps]
        quarter = max(1, len(times) // 4)
        return {
            "batch": batch,
            "steps": len(times),
            "step_ms_p50": median_ms(times),
            "first_quarter_ms_p50": median_ms(times[:quarter]),
            "last_quarter_ms_p50": median_ms(times[-quarter:]),
            "step_audio_ms": round(1000 * steps[0].step_audio_seconds, 1) if steps else None,
            # After the run: a part that fell back to eager (failed capture, grown cache) shows 0.
            "graph_batches": engine.graph_batches,
        }

    sweep(a.batches, measure, a.json, a.profile)


if __name__ == "__main__":
    main()
