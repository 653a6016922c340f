"""Our batched attention-prior and end-of-speech rules decide exactly what NeMo's per-row
functions decide, over long random runs that reach every rule (short texts, sinks,
stuck positions, text ends)."""

from __future__ import annotations

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


def _nemo_alone(model, scores, length, state, rules):
    """NeMo's step for one row alone, as ``generate_speech`` runs a sequence: its scores
    over its own text. Returns its attended position, its prior over its text and whether
    its text is unfinished; updates ``state`` (last, counter, finished count)."""
    scores = scores[None, :length]
    attended, _ = model.get_most_attended_text_timestep(
        alignment_attention_scores=scores,
        last_attended_timesteps=[[state["last"]]],
        text_lens=torch.tensor([length]),
        lookahead_window_size=rules.window,
        attended_timestep_counter=[state["counter"]],
        batch_size=1,
    )
    finished = {} if state["finished"] is None else {0: state["finished"]}
    prior, unfinished, finished = model.construct_inference_prior(
        prior_epsilon=rules.epsilon,
        cross_attention_scores=scores,
        text_lens=torch.tensor([length]),
        text_time_step_attended=attended,
        attended_timestep_counter=[state["counter"]],
        unfinished_texts={},
        finished_texts_counter=finished,
        end_indices={},
        lookahead_window_size=rules.window,
        batch_size=1,
    )
    state["last"], state["finished"] = attended[0], finished.get(0)
    return attended[0], prior[0, 0].numpy(), unfinished.get(0, False)


@pytest.mark.parametrize("seed", range(4))
def test_attention_and_prior_equal_nemos_for_each_row_alone_step_after_step(model, seed):
    """Each row as NeMo decides for that sequence alone (NeMo's own batched call differs
    for texts under 3 tokens: its look-ahead window then ends at a negative index, which
    counts from the end of the batch's padded width)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    text_lens = [rng.choice([2, 3, 4, 5, 6, 9, 17, 40]) for _ in range(12)]
    width, rules = max(text_lens), PriorRules(epsilon=0.1, window=rng.choice([3, 6]))
    ours = {"last": [1] * 12, "counters": [{} for _ in range(12)], "finished": [None] * 12}
    nemo = [{"last": 1, "counter": {}, "finished": None} for _ in text_lens]
    stuck = short = ended = 0
    for _ in range(80):
        scores = _scores(rng, ours["last"], width)
        attended = most_attended(scores.numpy(), ours["last"], ours["counters"], text_lens, rules.window)
        prior = inference_prior(attended, ours["counters"], text_lens, width, rules)
        unfinished, ours["finished"] = text_progress(attended, text_lens, ours["finished"])
        ours["last"] = attended
        for row, length in enumerate(text_lens):
            nemo_attended, nemo_prior, nemo_unfinished = _nemo_alone(model, scores[row], length, nemo[row], rules)
            assert attended[row] == nemo_attended and ours["counters"][row] == nemo[row]["counter"]
            np.testing.assert_array_equal(prior[row, :length], nemo_prior)
            assert unfinished[row] == nemo_unfinished and ours["finished"][row] == nemo[row]["finished"]
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
