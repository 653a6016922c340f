"""ASR, TTS and LLM on one GPU: interleaved by the scheduler vs free-running.

Both modes load the same three engines once and run the same workload in-process:
``--asr-streams`` real-time ASR sessions streaming speech the whole time, and bot turns
one after another (an LLM request, its text feeding the TTS the way a voice pipeline's
sentence aggregator would, the turn's audio played out in real time). "free" gives each
engine its own thread, as three separate servers on one GPU would; "scheduled" runs all
of them through one ``GpuScheduler``; "scheduled-no-holds" too, but its scheduler never
leaves the GPU idle for a due ASR chunk. Reported per mode: time to first audio of a bot
turn (LLM request to first TTS audio) p50/p90, and ASR chunk latency p99 with the ASR
alone and under the turns' load.

    python -m bench.interleave --asr ASR --tts TTS --llm LLM.gguf --device cuda --json out.json
    python -m bench.interleave ... --modes scheduled scheduled-no-holds   # what waiting for ASR buys
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import soundfile as sf

from bench.common import SPEECH, percentiles_ms, write_json
from pipecat_nvidia.protocol import TtsAudio, TtsDone, TtsSpeak
from scheduler.host import HostSettings
from scheduler.policy import Targets
from scheduler.worker import GpuScheduler
from servers.asr.server import load_engine as load_asr
from servers.common.loading import own_worker
from servers.llm.engine import ChatRequest, LlmDelta, LlmFinished
from servers.llm.server import load_engine as load_llm
from servers.tts.server import load_engine as load_tts

SENTENCES = [
    "Sure, I can help with that.",
    "The forecast for tomorrow is mostly sunny with a light breeze.",
    "Temperatures will reach the low twenties in the afternoon.",
    "Is there anything else you would like to know?",
]
QUESTION = "What will the weather be like tomorrow, and should I bring an umbrella? " * 8


def prompt(mode: str, turn: int | str) -> list[dict]:
    """Turn ``turn``'s request in ``mode``: a user message of its own, so that every turn
    evaluates its ~130 tokens after the system prompt (the same request every turn would
    find all but one token cached after the first)."""
    system = f"You are a helpful voice assistant ({mode}). Answer in two or three short sentences."
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Turn {turn}. {QUESTION}"}]


MODES = ("free", "scheduled", "scheduled-no-holds")
"""Each engine on its own thread; one scheduler; one scheduler that never waits for ASR."""
CHARS_PER_SENTENCE = 60
"""LLM output that stands for one sentence handed to the TTS."""


def percentile_ms(values: list[float], q: float) -> float | None:
    return (percentiles_ms(values, (q,)) or [None])[0]


@dataclass
class Observed:
    chunk_latencies: list[float] = field(default_factory=list)

    def on_asr_step(self, stats) -> None:
        self.chunk_latencies.extend(stats.chunk_latencies)


class AsrStreams:
    """``count`` sessions each pushing 20 ms of speech every 20 ms, finalising every 5 s."""

    def __init__(self, engine, count: int, speech: np.ndarray):
        self._engine = engine
        self._speech = speech
        self._sids = [engine.open_session(lambda message: None) for _ in range(count)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for sid in self._sids:
            self._engine.close_session(sid)

    def _run(self) -> None:
        frame, offset, next_at, since_reset = 320, 0, time.monotonic(), 0
        while not self._stop.is_set():
            piece = self._speech[offset : offset + frame]
            offset = (offset + frame) % (len(self._speech) - frame)
            for sid in self._sids:
                self._engine.push_audio(sid, piece.tobytes())
            since_reset += frame
            if since_reset >= 5 * 16000:
                since_reset = 0
                for sid in self._sids:
                    self._engine.reset(sid, finalize=True, trailing_silence_ms=0)
            next_at += frame / 16000
            time.sleep(max(0.0, next_at - time.monotonic()))


class TtsRouter:
    """The bench's one TTS session: its messages go to the turn being measured."""

    def __init__(self) -> None:
        self.handler: Callable = lambda message: None

    def __call__(self, message) -> None:
        self.handler(message)


def bot_turn(
    llm, tts, tts_sid: int, router: TtsRouter, messages: list[dict], turn: int | str, max_tokens: int
) -> float:
    """One turn; returns seconds from the LLM request to the first TTS audio (NaN: none came)."""
    context_id = f"turn-{turn}"
    first_audio = threading.Event()
    done = threading.Event()
    audio_at: list[float] = []
    state = {"chars": 0, "spoken": 0}

    def on_tts(message) -> None:
        if isinstance(message, TtsAudio) and message.context_id == context_id and not audio_at:
            audio_at.append(time.monotonic())
            first_audio.set()
        elif isinstance(message, TtsDone) and message.context_id == context_id:
            done.set()

    router.handler = on_tts

    def speak_next() -> None:
        text = SENTENCES[state["spoken"] % len(SENTENCES)]
        state["spoken"] += 1
        tts.speak(tts_sid, TtsSpeak(context_id=context_id, text=text))

    def on_llm(event) -> None:
        if isinstance(event, LlmDelta):
            state["chars"] += len(event.content)
            if state["spoken"] == 0 or state["chars"] >= CHARS_PER_SENTENCE * state["spoken"]:
                speak_next()
        elif isinstance(event, LlmFinished):
            if state["spoken"] == 0:
                speak_next()
            tts.flush(tts_sid, context_id)

    started = time.monotonic()
    llm.submit(ChatRequest(messages, max_tokens=max_tokens), on_llm)
    first_audio.wait(60)
    done.wait(120)
    return audio_at[0] - started if audio_at else float("nan")


def run_mode(mode: str, engines: dict, args) -> dict:
    asr, tts, llm = engines["asr"], engines["tts"], engines["llm"]
    observed = Observed()
    scheduler = GpuScheduler(Targets(asr_holds=mode == "scheduled")) if mode != "free" else None
    observers = {"asr": observed.on_asr_step, "tts": lambda s: None, "llm": lambda s: None}
    stops: list[Callable[[], None]] = []
    streams = tts_sid = None
    # Whatever fails, the mode's drivers, streams and session end with it, so that the next
    # mode runs alone on the same engines.
    try:
        for name, engine in engines.items():
            drive = scheduler.driver(name) if scheduler else own_worker(name)
            stops.append(drive(engine, observers[name]))
        speech, _ = sf.read(SPEECH, dtype="int16")
        streams = AsrStreams(asr, args.asr_streams, speech)
        router = TtsRouter()
        tts_sid = tts.open_session(router)
        streams.start()
        time.sleep(args.idle_s)
        idle = list(observed.chunk_latencies)

        def turn(n: int | str) -> float:
            return bot_turn(llm, tts, tts_sid, router, prompt(mode, n), n, args.max_tokens)

        turn("warm-up")  # the mode's first request also evaluates its system prompt: not measured
        observed.chunk_latencies.clear()
        measured = [turn(n) for n in range(args.turns)]
        loaded = list(observed.chunk_latencies)
    finally:
        if streams is not None:
            streams.stop()
        if tts_sid is not None:
            tts.close_session(tts_sid)
        for stop in stops:
            stop()
    ttfa = [t for t in measured if np.isfinite(t)]
    result = {
        "time_to_first_audio_ms_p50": percentile_ms(ttfa, 50),
        "time_to_first_audio_ms_p90": percentile_ms(ttfa, 90),
        "turns_without_audio": len(measured) - len(ttfa),
        "asr_chunk_latency_ms_p99_idle": percentile_ms(idle, 99),
        "asr_chunk_latency_ms_p99_loaded": percentile_ms(loaded, 99),
        "turns": len(measured),
        "asr_chunks_idle": len(idle),
        "asr_chunks_loaded": len(loaded),
    }
    if scheduler is not None:
        result["units"] = {
            u.value: sum(1 for r in scheduler.history if r.unit is u) for u in {r.unit for r in scheduler.history}
        }
        result["max_asr_wait_units"] = scheduler.max_asr_wait_units
        result["holds_for_asr"] = scheduler.metrics.registry.get_sample_value("scheduler_holds_total")
    return result


def run_modes(modes: list[str], engines: dict, args) -> dict:
    """Each mode in turn. A mode that raises gets ``{"error": ...}`` and the next one runs;
    ``--json`` is rewritten after every mode, so a run cut short keeps the modes it finished."""
    results: dict[str, dict] = {}
    for mode in modes:
        started = time.monotonic()
        try:
            results[mode] = run_mode(mode, engines, args)
        except Exception as e:  # one mode's failure must not lose the others
            traceback.print_exc()
            results[mode] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{mode}: {json.dumps(results[mode])} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, results)
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--asr", required=True)
    p.add_argument("--tts", required=True)
    p.add_argument("--codec", default=None)
    p.add_argument("--llm", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--llm-gpu-layers", type=int, default=-1)
    p.add_argument("--asr-streams", type=int, default=4)
    p.add_argument("--right-context", type=int, default=HostSettings().asr.right_context, help="ASR chunk size")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument(
        "--idle-s",
        type=float,
        default=10.5,
        help="ASR alone before the turns: two of its 5 s finalise cycles and a margin, so the idle window holds "
        "final steps as the loaded one does",
    )
    p.add_argument("--tts-max-frames-per-token", type=float, default=1.5)
    p.add_argument("--modes", nargs="+", choices=MODES, default=["free", "scheduled"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    # The local host's settings (graph buckets and batches for a few streams), not a server's.
    host = HostSettings()
    engines = {
        "asr": load_asr(replace(host.asr, model=args.asr, device=args.device, right_context=args.right_context)),
        "tts": load_tts(
            replace(
                host.tts,
                model=args.tts,
                codec=args.codec,
                device=args.device,
                max_frames_per_token=args.tts_max_frames_per_token,
            )
        ),
        "llm": load_llm(replace(host.llm, model=args.llm, gpu_layers=args.llm_gpu_layers)),
    }
    results = run_modes(args.modes, engines, args)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(1 if any("error" in result for result in main().values()) else 0)
