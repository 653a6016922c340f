"""Who gets the GPU next: a pure function of the queues' state.

On one GPU, models that run at the same time slow each other down, so the scheduler gives
the GPU to one unit of work at a time and chooses each by what the conversation needs:

1. ASR: its steps are short and the user may be barging in. It runs whenever it has a
   ready chunk, except that one urgent unit may go first (not one the GPU has already
   waited with for this chunk): ASR never waits for more than one unit.
2. The first pieces of a bot turn: the LLM's first segment, then the TTS's first
   audio. Together they are the latency the user hears.
3. More TTS when some turn's audio ahead of its playout falls below the target.
4. More LLM when some turn the TTS is speaking runs short of text.
5. Otherwise whatever has work, TTS first (building up audio is never wasted).

A unit runs to its end once started, so the one ASR waits behind adds its whole length
to the ASR's latency. But ASR chunks arrive on a clock: when the chosen unit would still
be running when the next chunk is due, the GPU waits for the chunk instead
(``hold_for``), and the unit runs after its step (it waits for one chunk at most: one
too long for any gap would find the next one due as well), running meanwhile another
model's work that ends before the chunk is due, or as many LLM tokens as fit, if there
is any (``plan``). Urgent units wait only for a chunk due very soon: they are the
latency the user hears too.

The mechanism that runs the units and measures them is ``scheduler.worker``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Unit(StrEnum):
    ASR = "asr"
    LLM_FIRST = "llm_first"
    """Decode a turn's first (short) segment of text."""
    TTS_FIRST = "tts_first"
    """A TTS step while some turn waits for its first audio."""
    TTS = "tts"
    LLM = "llm"

    @property
    def model(self) -> str:
        return self.value.split("_")[0]

    @property
    def urgent(self) -> bool:
        return self in (Unit.LLM_FIRST, Unit.TTS_FIRST)


@dataclass(frozen=True)
class QueueState:
    """A snapshot of every model's pending work, as the policy needs it."""

    asr_ready: bool = False
    asr_waited_units: int = 0
    """Units started since ASR last became ready (0: it just did)."""
    asr_due_s: float | None = None
    """Seconds until ASR is expected to have a chunk ready (None: no session is streaming)."""
    asr_period_s: float | None = None
    """Seconds between a streaming session's chunks."""
    llm_first_pending: bool = False
    """A turn's request is waiting for its first segment of text."""
    llm_generating: bool = False
    tts_first_pending: bool = False
    """Some turn has text to speak and no audio yet."""
    tts_has_work: bool = False
    tts_min_ahead_s: float | None = None
    """The least audio ahead of playout among turns being played (None: none is)."""
    tts_text_ahead_s: float | None = None
    """The least speech any turn still has text for, in seconds, among turns that may get
    more (None: none is waiting for text)."""
    tts_next_decodes: bool = False
    """The next TTS step will probably also decode audio (it takes longer)."""
    tts_next_starts: bool = False
    """The next TTS step also starts a segment (it takes longer)."""
    held: Unit | None = None
    """A unit that has waited for an ASR chunk (the chunk's step has run) since it was last
    chosen to run."""
    holding: Unit | None = None
    """A unit waiting for a due ASR chunk: the chunk's step runs first once it is ready."""


@dataclass(frozen=True)
class Targets:
    audio_ahead_s: float = 0.5
    """Keep at least this much audio ahead of each turn's playout."""
    text_ahead_s: float = 2.0
    """Keep at least this much speech worth of text queued for the TTS."""
    urgent_hold_s: float = 0.05
    """A turn's first text or audio waits for an ASR chunk due at most this soon."""
    asr_holds: bool = True
    """Whether any unit waits for a due ASR chunk (``hold_for``)."""


def choose(state: QueueState, targets: Targets = Targets()) -> Unit | None:
    """The next unit to run, or None when there is nothing to do."""
    urgent = Unit.LLM_FIRST if state.llm_first_pending else Unit.TTS_FIRST if state.tts_first_pending else None
    if state.asr_ready and (state.asr_waited_units >= 1 or urgent is None or state.holding is not None):
        return Unit.ASR
    if urgent is not None:
        return urgent
    audio_low = (
        state.tts_has_work and state.tts_min_ahead_s is not None and state.tts_min_ahead_s < targets.audio_ahead_s
    )
    if audio_low:
        return Unit.TTS
    text_low = state.tts_text_ahead_s is None or state.tts_text_ahead_s < targets.text_ahead_s
    if state.llm_generating and text_low:
        return Unit.LLM
    if state.tts_has_work:
        return Unit.TTS
    if state.llm_generating:
        return Unit.LLM
    return None


def hold_for(unit: Unit, state: QueueState, expected_s: Mapping[Unit, float], targets: Targets = Targets()) -> float:
    """Seconds to leave the GPU idle for an ASR chunk before running ``unit`` (0: run it now).

    ``expected_s``: how long units of each kind take (from measurements; a kind without
    one is never held). A unit that ends before the chunk is due runs now. One that does
    not waits, and the chunk then waits for nothing; a unit too long for the gap before
    the chunk after makes that one wait ``asr + duration - period``, less than the
    ``duration - due`` the due chunk would wait behind it, unless the chunk is due almost
    a period away (``due + asr >= period``: then it runs now). So does TTS whose listener
    would run dry while it waited, and a unit that has waited for a chunk already.
    """
    due, period = state.asr_due_s, state.asr_period_s
    duration, asr = expected_s.get(unit), expected_s.get(Unit.ASR)
    if (
        not targets.asr_holds
        or unit in (Unit.ASR, state.held)
        or state.asr_ready
        or None in (due, period, duration, asr)
    ):
        return 0.0
    if duration <= due or due + asr >= period:
        return 0.0
    if due > (targets.urgent_hold_s if unit.urgent else math.inf):
        return 0.0
    ahead = state.tts_min_ahead_s
    if unit.model == "tts" and ahead is not None and ahead < due + asr + duration:
        return 0.0
    return due


@dataclass(frozen=True)
class Decision:
    unit: Unit | None
    """What to run now (None: nothing)."""
    wait_s: float = 0.0
    """With no unit: how long to leave the GPU idle for a due ASR chunk (0: until work comes)."""
    budget_s: float | None = None
    """For an LLM unit: the time it has before a due ASR chunk (it generates what fits)."""
    held: Unit | None = None
    """The unit that waits for the chunk while the GPU idles or runs ``unit`` instead."""


def plan(state: QueueState, expected_s: Mapping[Unit, float], targets: Targets = Targets()) -> Decision:
    """``choose``'s unit, unless it waits for a due ASR chunk (``hold_for``): then another
    model's work that ends before the chunk is due, else LLM tokens until the chunk (an LLM
    unit can stop after any token; its first, with the prompt, cannot), else nothing."""
    unit = choose(state, targets)
    if unit is None:
        return Decision(None)
    hold = hold_for(unit, state, expected_s, targets)
    if not hold:
        return Decision(unit)
    others = [u for u in _pending(state) if u.model != unit.model]
    for other in others:
        if expected_s.get(other, math.inf) <= hold:
            return Decision(other, held=unit)
    if Unit.LLM in (unit, *others):
        return Decision(Unit.LLM, budget_s=hold, held=None if unit is Unit.LLM else unit)
    return Decision(None, hold, held=unit)


def _pending(state: QueueState) -> list[Unit]:
    """The unit each model other than the ASR would run next, urgent ones first."""
    llm = Unit.LLM_FIRST if state.llm_first_pending else Unit.LLM if state.llm_generating else None
    tts = Unit.TTS_FIRST if state.tts_first_pending else Unit.TTS if state.tts_has_work else None
    return sorted((u for u in (llm, tts) if u is not None), key=lambda u: not u.urgent)
