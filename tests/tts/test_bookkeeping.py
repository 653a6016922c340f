"""Our batched attention-prior and end-of-speech rules decide exactly what NeMo's per-row
functions decide, over long random runs that reach every rule (short texts, sinks,
stuck positions, text ends)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from servers.tts.bookkeeping import PriorRules, first_eos_frames, inference_prior, most_attended, text_progress
from servers.tts.model import SamplingSettings, load_magpie


@pytest.fixture(scope="module")
def model(tiny_tts_path):
    return load_magpie(str(tiny_tts_path), device="cpu", sampling=SamplingSettings(temperature=0.0))


def _scores(rng: random.Random, last: list[int], width: int) -> torch.Tensor:
    """Alignment scores that mostly stay near where each row attended, so that rows stall
    (sinks, stuck positions) as well as move on and reach their text's end."""
    scores = torch.rand(len(last), width)
    for row, position in enumerate(last):
        target = min(width - 1, position + rng.choice([0, 0, 0, 1, 2]))
        scores[row, target] += 2.0
    return scores


@pytest.mark.parametrize("seed", range(4))
def test_attention_and_prior_equal_nemos_step_after_step(model, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    text_lens = [rng.choice([3, 4, 5, 6, 9, 17, 40]) for _ in range(12)]
    width, rules = max(text_lens), PriorRules(epsilon=0.1, window=rng.choice([3, 6]))
    ours = {"last": [1] * 12, "counters": [{} for _ in range(12)], "finished": [None] * 12}
    nemo = copy.deepcopy(ours)
    stuck = short = ended = 0
    for _ in range(80):
        scores = _scores(rng, ours["last"], width)
        nemo_attended, nemo["counters"] = model.get_most_attended_text_timestep(
            alignment_attention_scores=scores,
            last_attended_timesteps=[nemo["last"]],
            text_lens=torch.tensor(text_lens),
            lookahead_window_size=rules.window,
            attended_timestep_counter=nemo["counters"],
            batch_size=len(text_lens),
        )
        finished = {i: c for i, c in enumerate(nemo["finished"]) if c is not None}
        nemo_prior, nemo_unfinished, finished = model.construct_inference_prior(
            prior_epsilon=rules.epsilon,
            cross_attention_scores=scores,
            text_lens=torch.tensor(text_lens),
            text_time_step_attended=nemo_attended,
            attended_timestep_counter=nemo["counters"],
            unfinished_texts={},
            finished_texts_counter=finished,
            end_indices={},
            lookahead_window_size=rules.window,
            batch_size=len(text_lens),
        )
        nemo["last"], nemo["finished"] = nemo_attended, [finished.get(i) for i in range(len(text_lens))]

        attended = most_attended(scores.numpy(), ours["last"], ours["counters"], text_lens, rules.window)
        prior = inference_prior(attended, ours["counters"], text_lens, width, rules)
        unfinished, ours["finished"] = text_progress(attended, text_lens, ours["finished"])
        ours["last"] = attended

        assert attended == nemo_attended and ours["counters"] == nemo["counters"]
        np.testing.assert_array_equal(prior, nemo_prior[:, 0].numpy())
        assert unfinished == [nemo_unfinished.get(i, False) for i in range(len(text_lens))]
        assert ours["finished"] == nemo["finished"]
        stuck += sum(any(v >= 10 for v in c.values()) for c in ours["counters"])
        short += sum(length <= 5 for length in text_lens)
        ended += sum(c is not None and c > 5 for c in ours["finished"])
    assert stuck and short and ended, "the run reached every rule"


@pytest.mark.parametrize(
    "method",
    [
        "argmax_any",
        "argmax_or_multinomial_any",
        "argmax_all",
        "argmax_or_multinomial_all",
        "argmax_zero_cb",
        "argmax_or_multinomial_zero_cb",
    ],
)
def test_end_of_speech_frames_equal_nemos_detect_eos(model, method):
    from nemo.collections.tts.modules.magpietts_modules import EOSDetectionMethod

    method = EOSDetectionMethod(method)
    generator = torch.Generator().manual_seed(0)
    eos = model.audio_eos_id
    shape = (256, model.num_audio_codebooks, 4)
    sampled, argmax = (torch.randint(0, 64, shape, generator=generator) for _ in range(2))
    # Rows with no, some, whole frames of and only codes at end of speech.
    sampled[sampled == 0], argmax[argmax == 0] = eos, eos
    sampled[:8], argmax[8:16], argmax[16:24, :, 2], sampled[24:32, :, 1] = eos, eos, eos, eos
    found = first_eos_frames(sampled.numpy(), argmax.numpy(), eos, method)
    expected = [model.detect_eos(s, a, method) for s, a in zip(sampled, argmax)]
    assert list(found) == expected
    assert np.isinf(found).any() and np.isfinite(found).any()
