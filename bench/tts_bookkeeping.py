"""Host time of the TTS decoder's per-step bookkeeping: NeMo's per-row functions against
``servers/tts/bookkeeping.py``, on the same random steps, by batch size.

The bookkeeping (most attended text position, next attention prior, end-of-speech search)
runs on the host after every decoder step, for every row; on a GPU the step itself is a
few graph replays, so this host time bounds how many segments one step can carry in
real time. No model is needed: NeMo's functions read nothing of the model but the EOS id.

    python -m bench.tts_bookkeeping --batches 1 16 64 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from types import SimpleNamespace

import torch

from servers.tts.bookkeeping import PriorRules, first_eos_frames, inference_prior, most_attended, text_progress

EOS_ID = 2017
CODEBOOKS, FRAMES = 8, 2
RULES = PriorRules(epsilon=0.1, window=6)
METHOD = "argmax_or_multinomial_any"


def nemo_functions():
    from nemo.collections.tts.models import MagpieTTSModel

    model = SimpleNamespace(audio_eos_id=EOS_ID)
    for name in ("get_most_attended_text_timestep", "construct_inference_prior", "find_eos_frame_index", "detect_eos"):
        setattr(model, name, types.MethodType(getattr(MagpieTTSModel, name), model))
    return model


def random_steps(batch: int, text_len: int, steps: int) -> list[tuple]:
    rng = torch.Generator().manual_seed(0)
    return [
        (
            torch.rand(batch, text_len, generator=rng),
            torch.randint(0, 2048, (batch, CODEBOOKS, FRAMES), generator=rng),
            torch.randint(0, 2048, (batch, CODEBOOKS, FRAMES), generator=rng),
        )
        for _ in range(steps)
    ]


def time_nemo(model, method, inputs, text_len: int) -> list[float]:
    batch = len(inputs[0][0])
    text_lens = torch.full((batch,), text_len)
    last, counters, finished = [1] * batch, [{} for _ in range(batch)], {}
    times = []
    for scores, sampled, argmax in inputs:
        started = time.perf_counter()
        last, counters = model.get_most_attended_text_timestep(
            alignment_attention_scores=scores,
            last_attended_timesteps=[last],
            text_lens=text_lens,
            lookahead_window_size=RULES.window,
            attended_timestep_counter=counters,
            batch_size=batch,
        )
        model.construct_inference_prior(
            prior_epsilon=RULES.epsilon,
            cross_attention_scores=scores,
            text_lens=text_lens,
            text_time_step_attended=last,
            attended_timestep_counter=counters,
            unfinished_texts={},
            finished_texts_counter=finished,
            end_indices={},
            lookahead_window_size=RULES.window,
            batch_size=batch,
        )
        for i in range(batch):
            model.detect_eos(sampled[i], argmax[i], method)
        times.append(time.perf_counter() - started)
    return times


def time_ours(method, inputs, text_len: int) -> list[float]:
    batch = len(inputs[0][0])
    text_lens = [text_len] * batch
    last, counters, finished = [1] * batch, [{} for _ in range(batch)], [None] * batch
    times = []
    for scores, sampled, argmax in inputs:
        started = time.perf_counter()
        last = most_attended(scores.numpy(), last, counters, text_lens, RULES.window)
        inference_prior(last, counters, text_lens, text_len, RULES)
        _, finished = text_progress(last, text_lens, finished)
        first_eos_frames(sampled.numpy(), argmax.numpy(), EOS_ID, method)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    from nemo.collections.tts.modules.magpietts_modules import EOSDetectionMethod

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--text-tokens", type=int, default=60)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, method = nemo_functions(), EOSDetectionMethod(METHOD)
    results = []
    for batch in args.batches:
        inputs = random_steps(batch, args.text_tokens, args.steps)
        nemo = statistics.median(time_nemo(model, method, inputs, args.text_tokens))
        ours = statistics.median(time_ours(method, inputs, args.text_tokens))
        result = {
            "batch": batch,
            "nemo_ms": round(1000 * nemo, 3),
            "ours_ms": round(1000 * ours, 3),
            "nemo_us_per_row": round(1e6 * nemo / batch, 1),
            "ours_us_per_row": round(1e6 * ours / batch, 1),
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
