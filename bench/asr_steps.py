"""ASR engine step time against batch size, in process (no WebSocket, no clients).

For each batch size B, B sessions each get a few seconds of real speech at once and the
engine steps (on this thread, which the profiler sees) until all of it is transcribed. Every
step then carries all B sessions, so the median step time at B is the cost of one
streaming step for B streams: a real-time server sustains B streams while it stays under
the chunk period. A step that does not finish within ``--timeout-s`` dumps every thread's
stack and exits, so a hang on a new machine shows where it is.

    python -m bench.asr_steps --model model.nemo --device cuda --batches 1 64 256 --json out.json
    python -m bench.asr_steps --model model.nemo --device cuda --cuda-graph-max-batch 0   # eager
    python -m bench.asr_steps --model model.nemo --batches 512 --profile prof/   # where a step's time goes
"""

from __future__ import annotations

import argparse
import faulthandler
import statistics
import sys
import time
from pathlib import Path

import soundfile as sf

from bench.common import SPEECH
from bench.steps import sweep
from servers.asr.config import AsrServerSettings
from servers.asr.server import load_engine
from servers.common.settings import PRECISIONS


def step_times(engine, batch: int, seconds: float, timeout_s: float) -> list[float]:
    """Seconds of each step that carried all ``batch`` sessions."""
    speech, _ = sf.read(SPEECH, dtype="int16")
    audio = speech[: int(seconds * engine.geometry.sample_rate)].tobytes()
    sids = [engine.open_session(lambda message: None) for _ in range(batch)]
    for sid in sids:
        engine.push_audio(sid, audio)
        engine.reset(sid, finalize=True)
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    stats = engine.run_until_idle()
    faulthandler.cancel_dump_traceback_later()
    for sid in sids:
        engine.close_session(sid)
    return [s.seconds for s in stats if s.batch_size == batch and not s.first_rows and not s.final_rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="as the server's --precision")
    p.add_argument("--right-context", type=int, default=1)
    p.add_argument(
        "--cuda-graph-max-batch", type=int, default=AsrServerSettings.cuda_graph_max_batch, help="0: eager NeMo"
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--seconds", type=float, default=4.0, help="speech per session")
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--json", default=None)
    p.add_argument("--profile", type=Path, help="write each batch's torch.profiler op tables (host and GPU) here")
    a = p.parse_args()
    faulthandler.dump_traceback_later(a.timeout_s * 3, exit=True)
    started = time.monotonic()
    settings = AsrServerSettings(
        model=a.model,
        device=a.device,
        precision=a.precision,
        right_context=a.right_context,
        max_sessions=max(a.batches),
        cuda_graph_max_batch=a.cuda_graph_max_batch,
    )
    engine = load_engine(settings)
    faulthandler.cancel_dump_traceback_later()
    print(f"loaded and warmed up in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    graphs = engine.encoder_graphs

    def measure(batch: int) -> dict:
        eager_before = graphs.eager_steps if graphs else 0
        times = step_times(engine, batch, a.seconds, a.timeout_s)
        return {
            "batch": batch,
            "steps": len(times),
            "step_ms_p50": round(1000 * statistics.median(times), 2) if times else None,
            "step_ms_max": round(1000 * max(times), 2) if times else None,
            "chunk_ms": engine.geometry.chunk_ms,
            "cuda_graph_max_batch": a.cuda_graph_max_batch,
            # Steps of the run that missed every graph bucket (here: all sessions' finals at
            # once, more rows than final buckets hold); None: graphs off.
            "eager_encoder_steps": graphs.eager_steps - eager_before if graphs else None,
        }

    sweep(a.batches, measure, a.json, a.profile)


if __name__ == "__main__":
    main()
