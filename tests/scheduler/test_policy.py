"""The scheduling policy on synthetic queues."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from scheduler.policy import Decision, QueueState, Targets, Unit, choose, hold_for, plan


def test_nothing_to_do_means_no_unit():
    assert choose(QueueState()) is None


def test_asr_runs_whenever_it_has_work_and_nothing_is_urgent():
    state = QueueState(asr_ready=True, tts_has_work=True, tts_min_ahead_s=0.1, llm_generating=True)
    assert choose(state) is Unit.ASR


def test_one_urgent_unit_may_go_before_asr_but_no_more():
    urgent = QueueState(asr_ready=True, asr_waited_units=0, llm_first_pending=True)
    assert choose(urgent) is Unit.LLM_FIRST
    assert choose(QueueState(asr_ready=True, asr_waited_units=1, llm_first_pending=True)) is Unit.ASR


def test_a_turns_first_text_comes_before_its_first_audio():
    state = QueueState(llm_first_pending=True, tts_first_pending=True, tts_has_work=True)
    assert choose(state) is Unit.LLM_FIRST
    assert choose(QueueState(tts_first_pending=True, tts_has_work=True, llm_generating=True)) is Unit.TTS_FIRST


@pytest.mark.parametrize(
    ("ahead", "text", "expected"),
    [
        (0.2, 0.5, Unit.TTS),  # audio about to run out beats text running short
        (3.0, 0.5, Unit.LLM),  # audio is safe, text is short
        (3.0, 5.0, Unit.TTS),  # both fine: build up audio
    ],
)
def test_tts_stays_ahead_of_playout_and_llm_feeds_it(ahead, text, expected):
    state = QueueState(llm_generating=True, tts_has_work=True, tts_min_ahead_s=ahead, tts_text_ahead_s=text)
    assert choose(state, Targets(audio_ahead_s=0.5, text_ahead_s=2.0)) is expected


def test_llm_runs_when_tts_has_nothing_to_do():
    assert choose(QueueState(llm_generating=True)) is Unit.LLM


EXPECTED = {Unit.ASR: 0.01, Unit.LLM_FIRST: 0.03, Unit.LLM: 0.03, Unit.TTS_FIRST: 0.06, Unit.TTS: 0.06}


@pytest.mark.parametrize(
    ("unit", "due", "ahead", "expected_hold"),
    [
        (Unit.LLM, 0.02, None, 0.02),  # would still run when the chunk is due: wait for it
        (Unit.LLM, 0.05, None, 0.0),  # ends before the chunk is due
        (Unit.TTS, 0.04, 2.0, 0.04),
        (Unit.TTS, 0.04, 0.08, 0.0),  # waiting would let the listener's audio run out
        (Unit.TTS_FIRST, 0.04, None, 0.04),  # the chunk is due soon enough to wait for
        (Unit.TTS_FIRST, 0.055, None, 0.0),  # a turn's first audio waits only briefly
    ],
)
def test_a_unit_that_would_delay_a_due_asr_chunk_waits_for_it(unit, due, ahead, expected_hold):
    state = QueueState(asr_due_s=due, asr_period_s=0.16, tts_min_ahead_s=ahead)
    assert hold_for(unit, state, EXPECTED, Targets(urgent_hold_s=0.05)) == expected_hold


def test_no_unit_waits_for_asr_that_is_not_streaming_or_for_a_unit_of_unknown_length():
    assert hold_for(Unit.LLM, QueueState(asr_due_s=None, asr_period_s=0.16), EXPECTED) == 0.0
    assert hold_for(Unit.LLM, QueueState(asr_due_s=0.02, asr_period_s=0.16), {Unit.ASR: 0.01}) == 0.0


@pytest.mark.parametrize(
    ("due", "expected_hold"),
    [
        (0.01, 0.01),  # now: the chunk waits 190 ms; held: the next one waits 50 ms
        (0.12, 0.12),  # now: 80 ms; held: 50 ms
        (0.155, 0.0),  # due almost a period away: held, the next chunk would wait longer
    ],
)
def test_a_unit_longer_than_the_gap_between_chunks_waits_when_that_spares_the_asr(due, expected_hold):
    state = QueueState(asr_due_s=due, asr_period_s=0.16, tts_min_ahead_s=3.0)
    assert hold_for(Unit.TTS, state, {Unit.ASR: 0.01, Unit.TTS: 0.2}) == expected_hold


def test_a_turns_first_audio_does_not_wait_when_another_turns_listener_would_run_dry():
    """The step that makes one turn's first audio also feeds the turns being played."""
    state = QueueState(asr_due_s=0.04, asr_period_s=0.16, tts_first_pending=True, tts_min_ahead_s=0.05)
    assert hold_for(Unit.TTS_FIRST, state, EXPECTED, Targets(urgent_hold_s=0.05)) == 0.0


def test_a_unit_waits_for_one_chunk_at_most():
    """After the chunk's step the next chunk is due about a period away, and a unit too
    long for any gap would be held for it too, and for every one after."""
    state = QueueState(asr_due_s=0.01, asr_period_s=0.16, tts_has_work=True, tts_min_ahead_s=3.0)
    expected = {Unit.ASR: 0.01, Unit.TTS: 0.2}
    assert plan(state, expected) == Decision(None, wait_s=0.01, held=Unit.TTS)
    after_the_chunk = replace(state, asr_due_s=0.145, held=Unit.TTS)
    assert plan(after_the_chunk, expected) == Decision(Unit.TTS)


def test_the_chunk_a_unit_waited_for_runs_before_it_even_an_urgent_one():
    """Otherwise a turn's first text would be late by the wait, and the chunk would still
    wait for it."""
    expected = {Unit.ASR: 0.01, Unit.LLM_FIRST: 0.1}
    state = QueueState(asr_due_s=0.03, asr_period_s=0.16, llm_first_pending=True, llm_generating=True)
    assert plan(state, expected) == Decision(None, wait_s=0.03, held=Unit.LLM_FIRST)
    chunk_ready = replace(state, asr_ready=True, asr_due_s=0.0, holding=Unit.LLM_FIRST)
    assert plan(chunk_ready, expected) == Decision(Unit.ASR)


def test_a_unit_still_waiting_for_its_chunk_is_held_again():
    state = QueueState(asr_due_s=0.01, asr_period_s=0.16, tts_has_work=True, tts_min_ahead_s=3.0, holding=Unit.TTS)
    assert plan(state, {Unit.ASR: 0.01, Unit.TTS: 0.2}) == Decision(None, wait_s=0.01, held=Unit.TTS)


def test_while_a_unit_waits_for_asr_other_work_that_ends_in_time_runs():
    state = QueueState(
        asr_due_s=0.04,
        asr_period_s=0.16,
        tts_has_work=True,
        tts_min_ahead_s=2.0,
        tts_text_ahead_s=5.0,
        llm_generating=True,
    )
    assert choose(state) is Unit.TTS
    held = Unit.TTS
    assert plan(state, {**EXPECTED, Unit.LLM: 0.03}) == Decision(Unit.LLM, held=held), "a whole LLM unit ends in time"
    assert plan(state, {**EXPECTED, Unit.LLM: 0.05}) == Decision(Unit.LLM, budget_s=0.04, held=held), "tokens that fit"
    assert plan(replace(state, llm_generating=False), EXPECTED) == Decision(None, wait_s=0.04, held=held), "none fits"
    assert plan(QueueState(tts_has_work=True), EXPECTED) == Decision(Unit.TTS), "no ASR to wait for"


def test_an_llm_unit_that_would_delay_a_due_asr_chunk_stops_in_time():
    state = QueueState(asr_due_s=0.03, asr_period_s=0.16, llm_generating=True)
    assert plan(state, {**EXPECTED, Unit.LLM: 0.07}) == Decision(Unit.LLM, budget_s=0.03)


@dataclass
class _Turn:
    """A simulated bot turn: the LLM writes speech (in seconds of it), TTS speaks it."""

    start: float
    speech_s: float
    llm_first_s: float = 1.5
    llm_chunk_s: float = 0.5
    text_s: float = 0.0
    synthesized_s: float = 0.0
    first_audio_at: float | None = None
    underrun_s: float = 0.0

    def ahead(self, now: float) -> float:
        return self.synthesized_s - (now - self.first_audio_at)


@dataclass
class _Simulation:
    """ASR chunks every 160 ms (10 ms a step), one LLM unit 30 ms, one TTS step 60 ms
    making 93 ms of audio per turn: the policy decides, nothing runs concurrently."""

    asr_step: float = 0.010
    llm_unit: float = 0.030
    tts_step: float = 0.060
    tts_audio_per_step: float = 0.093
    now: float = 0.0
    asr_next_chunk: float = 0.16
    asr_ready_since: float | None = None
    asr_waited: int = 0
    asr_worst_wait_units: int = 0
    asr_waits_s: list[float] = field(default_factory=list)
    """How long each ASR chunk waited for the GPU."""
    expected: dict | None = None
    """Unit durations the scheduler has measured; None: it plans with none (never holds)."""
    log: list[Unit] = field(default_factory=list)

    def state(self, turn: _Turn) -> QueueState:
        started = self.now >= turn.start
        return QueueState(
            asr_ready=self.asr_ready_since is not None,
            asr_waited_units=self.asr_waited,
            asr_due_s=max(0.0, self.asr_next_chunk - self.now),
            asr_period_s=0.16,
            llm_first_pending=started and turn.text_s == 0,
            llm_generating=started and turn.text_s < turn.speech_s,
            tts_first_pending=turn.text_s > 0 and turn.first_audio_at is None,
            tts_has_work=turn.synthesized_s < turn.text_s,
            tts_min_ahead_s=None if turn.first_audio_at is None else turn.ahead(self.now),
            tts_text_ahead_s=(turn.text_s - turn.synthesized_s) if turn.text_s else None,
        )

    def run(self, turn: _Turn, until: float) -> None:
        while self.now < until:
            if self.now >= self.asr_next_chunk:
                if self.asr_ready_since is None:
                    self.asr_ready_since, self.asr_waited = self.asr_next_chunk, 0
                self.asr_next_chunk += 0.16
            decision = plan(self.state(turn), self.expected or {})
            unit = decision.unit
            if unit is None:
                self.now += decision.wait_s or 0.0
                if not decision.wait_s:
                    self.now = min(self.asr_next_chunk, max(self.now + 0.001, turn.start))
                continue
            self.log.append(unit)
            if self.asr_ready_since is not None and unit is not Unit.ASR:
                self.asr_waited += 1
                self.asr_worst_wait_units = max(self.asr_worst_wait_units, self.asr_waited)
            if unit is Unit.ASR:
                self.asr_waits_s.append(self.now - self.asr_ready_since)
                self.now += self.asr_step
                self.asr_ready_since = None
            elif unit in (Unit.LLM_FIRST, Unit.LLM):
                share = min(1.0, (decision.budget_s or self.llm_unit) / self.llm_unit)  # tokens that fit
                self.now += share * self.llm_unit
                text = turn.llm_first_s if unit is Unit.LLM_FIRST else share * turn.llm_chunk_s
                turn.text_s = min(turn.speech_s, turn.text_s + text)
            else:
                self.now += self.tts_step
                if turn.first_audio_at is not None:
                    turn.underrun_s += max(0.0, -turn.ahead(self.now))
                turn.synthesized_s = min(turn.text_s, turn.synthesized_s + self.tts_audio_per_step)
                turn.first_audio_at = turn.first_audio_at or self.now


def test_a_simulated_turn_starts_fast_never_runs_dry_and_never_starves_asr():
    sim = _Simulation()
    turn = _Turn(start=1.0, speech_s=6.0)
    sim.run(turn, until=10.0)
    assert sim.asr_worst_wait_units <= 1
    # First audio: the LLM's first segment and one TTS step (and at most one ASR step).
    assert turn.first_audio_at - turn.start <= sim.llm_unit + sim.tts_step + sim.asr_step + 1e-9
    assert turn.underrun_s == 0.0
    assert turn.synthesized_s == pytest.approx(6.0)
    first_audio = next(i for i, u in enumerate(sim.log) if u is Unit.TTS_FIRST)
    assert Unit.LLM not in sim.log[:first_audio], "no further text before the first audio"


def test_with_unit_durations_known_asr_chunks_seldom_wait_at_all():
    """The same turn planned around the ASR clock: the GPU idles for a due chunk rather than
    start a unit that would delay it, except a TTS step that keeps the listener's audio
    from running out; the turn never runs dry, and its first audio pays at most a short
    wait per urgent unit."""
    planned, unplanned = _Simulation(expected=EXPECTED), _Simulation()
    turn, unplanned_turn = _Turn(start=1.0, speech_s=6.0), _Turn(start=1.0, speech_s=6.0)
    planned.run(turn, until=10.0)
    unplanned.run(unplanned_turn, until=10.0)
    waited = [w for w in unplanned.asr_waits_s if w > 1e-9]
    assert len(waited) >= len(unplanned.asr_waits_s) / 4, "without planning, chunks wait behind units"
    waited = [w for w in planned.asr_waits_s if w > 1e-9]
    assert len(waited) <= 1 and max(waited, default=0.0) <= planned.tts_step
    assert turn.underrun_s == 0.0
    assert turn.synthesized_s == pytest.approx(6.0)
    waits = 2 * (Targets().urgent_hold_s + planned.asr_step)
    assert turn.first_audio_at - turn.start <= unplanned_turn.first_audio_at - unplanned_turn.start + waits + 1e-9
