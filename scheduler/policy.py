"""Who gets the GPU next: a pure function of the queues' state.

On one GPU, models that run at the same time slow each other down, so the scheduler gives
the GPU to one unit of work at a time and chooses each by what the conversation needs:

1. ASR: its steps are short and the user may be barging in. It runs whenever it has a
   ready chunk, except that one urgent unit may go first: ASR never waits for more
   than one unit.
2. The first pieces of a bot turn: the LLM's first segment, then the TTS's first
   audio. Together they are the latency the user hears.
3. More TTS when some turn's audio ahead of its playout falls below the target.
4. More LLM when the TTS is running short of text to speak.
5. Otherwise whatever has work, TTS first (building up audio is never wasted).

The mechanism that runs the units and measures them is ``scheduler.worker``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Unit(str, Enum):
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


@dataclass(frozen=True)
class QueueState:
    """A snapshot of every model's pending work, as the policy needs it."""

    asr_ready: bool = False
    asr_waited_units: int = 0
    """Units started since ASR last became ready (0: it just did)."""
    llm_first_pending: bool = False
    """A turn's request is waiting for its first segment of text."""
    llm_generating: bool = False
    tts_first_pending: bool = False
    """Some turn has text to speak and no audio yet."""
    tts_has_work: bool = False
    tts_min_ahead_s: float | None = None
    """The least audio ahead of playout among turns being played (None: none is)."""
    tts_text_ahead_s: float | None = None
    """Speech the TTS still has text for, in seconds (None: not speaking)."""


@dataclass(frozen=True)
class Targets:
    audio_ahead_s: float = 0.5
    """Keep at least this much audio ahead of each turn's playout."""
    text_ahead_s: float = 2.0
    """Keep at least this much speech worth of text queued for the TTS."""


def choose(state: QueueState, targets: Targets = Targets()) -> Unit | None:
    """The next unit to run, or None when there is nothing to do."""
    urgent = Unit.LLM_FIRST if state.llm_first_pending else Unit.TTS_FIRST if state.tts_first_pending else None
    if state.asr_ready and (state.asr_waited_units >= 1 or urgent is None):
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
