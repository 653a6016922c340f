"""NeMo's per-row attention-prior and end-of-speech rules for a batch, on host arrays.

After each decoder step, Magpie's inference finds where each row attends in its text,
builds the attention prior for its next step and looks for end of speech
(``get_most_attended_text_timestep``, ``construct_inference_prior``, ``detect_eos``).
NeMo does this row by row with single-element tensor reads and writes: about 100 µs of
host time per row per step, which at a batch of 64 is longer than a graphed GPU step.
These are the same rules over NumPy arrays (tests compare them with NeMo's functions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SINK_VISITS = 8
"""A position attended this often is passed over when looking for the next one."""
STUCK_VISITS = 10
"""A position attended this often, and all before it, lose the prior."""
SHORT_TEXT = 5
"""Texts of at most this many tokens get no prior."""


@dataclass(frozen=True)
class PriorRules:
    epsilon: float
    """The prior's weight away from the window."""
    window: int
    """How far ahead of the attended position the prior (and the search) reaches."""


def most_attended(
    scores: np.ndarray, last: list[int], counters: list[dict[int, int]], text_lens: list[int], window: int
) -> list[int]:
    """Each row's most attended text position ``(B, T)`` within its look-ahead window from
    where it attended last; counts the visit in its counter (NeMo's
    ``get_most_attended_text_timestep`` for one text chunk, as for a sequence alone: for a
    text under 3 tokens the window ends before it starts, which is the text's end; NeMo's
    batched call slices to a negative index there, into the batch's padding)."""
    attended = []
    for row, (start, counter, length) in enumerate(zip(last, counters, text_lens)):
        if counter.get(start, 0) >= SINK_VISITS:
            start += 1
        end = min(start + window, length - 3)
        position = int(scores[row, start:end].argmax()) + start if end > start else length - 1
        counter[position] = counter.get(position, 0) + 1
        attended.append(position)
    return attended


def inference_prior(
    attended: list[int], counters: list[dict[int, int]], text_lens: list[int], width: int, rules: PriorRules
) -> np.ndarray:
    """The attention prior ``(B, width)`` for each row's next step (NeMo's
    ``construct_inference_prior``): 1 at the attended position, the one before and the
    window after, ``epsilon`` elsewhere; nothing up to a position the row is stuck on."""
    prior = np.full((len(attended), width), rules.epsilon, dtype=np.float32)
    for row, (position, counter, length) in enumerate(zip(attended, counters, text_lens)):
        if length <= SHORT_TEXT:
            prior[row] = 1.0
        else:
            prior[row, max(1, position - 1)] = 1.0
            prior[row, position] = 1.0
            prior[row, min(position + 1, length - 1) : min(position + rules.window, length - 1) + 1] = 1.0
        stuck = [p for p, visits in counter.items() if visits >= STUCK_VISITS]
        if stuck:
            prior[row, : max(stuck) + 1] = rules.epsilon
    return prior


def text_progress(
    attended: list[int], text_lens: list[int], finished_counts: list[int | None]
) -> tuple[list[bool], list[int | None]]:
    """Per row: whether its text is still unfinished (end of speech is then forbidden), and
    the steps since it reached its text's end (NeMo's counters, from ``construct_inference_prior``)."""
    unfinished, counts = [], []
    for position, length, count in zip(attended, text_lens, finished_counts):
        if count is None and position >= length - 2:
            count = 0
        if count is not None:
            count += 1
        unfinished.append(position < length - 3 and (count is None or count <= 5))
        counts.append(count)
    return unfinished, counts


def first_eos_frames(sampled: np.ndarray, argmax: np.ndarray, eos_id: int, method) -> np.ndarray:
    """Per row, the first frame of its newest stack ``(B, codebooks, frames)`` that ends
    speech, ``inf`` if none (NeMo's ``detect_eos`` for an ``EOSDetectionMethod``)."""
    detection = method.detection_type(method)
    found = _first_eos(argmax, eos_id, detection)
    if method.sampling_type(method) == "argmax_or_multinomial":
        found = np.minimum(found, _first_eos(sampled, eos_id, detection))
    return found


def _first_eos(codes: np.ndarray, eos_id: int, detection: str) -> np.ndarray:
    is_eos = codes == eos_id
    if detection == "all":
        per_frame = is_eos.all(axis=1)
    elif detection == "zero_cb":
        per_frame = is_eos[:, 0]
    else:  # "any" (NeMo's EOSDetectionMethod allows no other)
        per_frame = is_eos.any(axis=1)
    return np.where(per_frame.any(axis=1), per_frame.argmax(axis=1), np.inf)
