"""The scheduler's mechanism times units and plans around the ASR clock (stand-in units of known length:
what is tested is the worker's timing, not any model)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from scheduler.policy import QueueState, Targets, Unit
from scheduler.worker import GpuScheduler
from servers.common.loading import EXCLUSIVE_GPU_WORK


def _run(seconds: float, targets: Targets | None = None, **engines) -> GpuScheduler:
    """A scheduler that drives ``engines`` (by model, attached in order) for ``seconds``."""
    scheduler = GpuScheduler(targets)
    for model, engine in engines.items():
        scheduler.driver(model)(engine, lambda stats: None)
    time.sleep(seconds)
    scheduler.stop()
    return scheduler


class _ClockedAsr:
    """A chunk due every ``period_s``; a step takes ``step_s``."""

    def __init__(self, period_s: float, step_s: float):
        self.geometry = SimpleNamespace(chunk_ms=1000 * period_s)
        self._period, self._step = period_s, step_s
        self._start = time.monotonic()
        self._served = 0
        self.waits: list[float] = []
        """Per chunk, from when it was due to when its step began."""

    def _next_due(self) -> float:
        return self._start + (self._served + 1) * self._period

    def has_work(self) -> bool:
        return time.monotonic() >= self._next_due()

    def due_in_s(self) -> float:
        return max(0.0, self._next_due() - time.monotonic())

    def step(self):
        due = self._next_due()
        self.waits.append(time.monotonic() - due)
        self._served += 1
        time.sleep(self._step)
        return SimpleNamespace(chunk_latencies=(time.monotonic() - due,))


class _BusyLlm:
    """Always generating; a unit takes ``unit_s``, or its budget when it has one."""

    def __init__(self, unit_s: float):
        self._unit = unit_s
        self.units = 0
        self.budgets: list[float] = []

    def queue_state(self):
        return SimpleNamespace(first_pending=False, generating=True)

    def step(self, budget_s: float | None = None) -> None:
        self.units += 1
        if budget_s is not None:
            self.budgets.append(budget_s)
        time.sleep(self._unit if budget_s is None else min(self._unit, budget_s))


def test_a_unit_that_would_delay_a_due_asr_chunk_is_cut_to_fit_before_it():
    llm, asr = _BusyLlm(unit_s=0.06), _ClockedAsr(period_s=0.16, step_s=0.01)
    _run(2.0, llm=llm, asr=asr)
    assert llm.units >= 15, "the LLM still gets the gaps between chunks"
    settled = asr.waits[2:]  # once a unit of each kind has been measured
    assert len(settled) >= 8
    assert max(settled) < 0.03, [round(w, 3) for w in asr.waits]
    # Cut to less than a whole unit: 60 ms, and the sleep's overshoot that the scheduler
    # measures with it (a chunk due 61 ms away cuts a unit measured at 62 ms).
    assert llm.budgets and max(llm.budgets) < 0.07, "LLM units were cut to the time before a chunk"


class _AlternatingTts:
    """Every other step also decodes audio, and takes six times as long; it says so ahead."""

    def __init__(self) -> None:
        self.steps = 0

    def queue_state(self):
        return SimpleNamespace(
            has_work=True,
            first_audio_pending=False,
            min_ahead_s=None,
            text_ahead_s=None,
            next_step_decodes=self.steps % 2 == 1,
            next_step_starts=False,
        )

    def step(self):
        time.sleep(0.03 if self.steps % 2 == 1 else 0.005)
        self.steps += 1
        return SimpleNamespace(synthesis_gaps=0, text_gaps=0)


def test_tts_steps_that_decode_audio_are_expected_to_take_longer():
    """One estimate for all TTS steps would be wrong both ways: too long for most steps
    (needless waits) and too short for the decoding ones (chunks delayed behind them)."""
    tts = _AlternatingTts()
    scheduler = _run(0.5, tts=tts)
    assert tts.steps >= 10
    plain = scheduler.expected_seconds(QueueState(tts_next_decodes=False))[Unit.TTS]
    decoding = scheduler.expected_seconds(QueueState(tts_next_decodes=True))[Unit.TTS]
    assert plain < 0.015 < 0.025 < decoding


class _DryTts(_AlternatingTts):
    """A turn whose listener has run dry; its first step's audio ends the silence (the
    synthesis was late), and the fifth ends another (its text was late)."""

    def queue_state(self):
        return SimpleNamespace(**{**vars(super().queue_state()), "min_ahead_s": -1.0})

    def step(self):
        super().step()
        return SimpleNamespace(synthesis_gaps=int(self.steps == 1), text_gaps=int(self.steps == 5))


def test_a_listener_running_dry_is_one_miss_of_whichever_model_was_late_not_one_per_step():
    tts = _DryTts()
    scheduler = _run(0.3, tts=tts)
    assert tts.steps >= 10

    def misses(model: str) -> float | None:
        return scheduler.metrics.registry.get_sample_value("scheduler_deadline_misses_total", {"model": model})

    assert (misses("tts"), misses("llm")) == (1.0, 1.0)


class _FailingLlm(_BusyLlm):
    def step(self, budget_s: float | None = None) -> None:
        self.units += 1
        raise RuntimeError("a bug in the unit")


def test_a_model_whose_unit_raises_sits_out_a_while_and_the_others_run():
    llm, tts = _FailingLlm(unit_s=0.0), _AlternatingTts()
    _run(1.5, llm=llm, tts=tts)
    assert 1 <= llm.units <= 2, "tried again after its time out, not at once"
    assert tts.steps >= 20


class _PrefillLlm:
    """A request whose long prompt takes ``units`` prefill units of ``unit_s``, each its
    first segment's (urgent)."""

    def __init__(self, unit_s: float, units: int):
        self._unit, self.left = unit_s, units

    def queue_state(self):
        return SimpleNamespace(first_pending=self.left > 0, generating=self.left > 0)

    def step(self, budget_s: float | None = None) -> None:
        self.left -= 1
        time.sleep(self._unit)


def test_a_chunk_that_falls_due_during_an_urgent_unit_runs_before_the_next_one():
    """The chunk waited for the unit it fell due in; a second urgent unit before it would
    make it wait for two, and at units near a chunk period ASR would fall ever further behind."""
    unit = 0.15
    llm, asr = _PrefillLlm(unit_s=unit, units=12), _ClockedAsr(period_s=0.16, step_s=0.005)
    scheduler = _run(12 * unit + 0.5, Targets(asr_holds=False), asr=asr, llm=llm)
    assert llm.left == 0 and len(asr.waits) >= 10
    assert max(asr.waits) < unit + 0.1, [round(w, 3) for w in asr.waits]  # two units: 0.3 s
    assert scheduler.max_asr_wait_units == 1


class _ToldAsr:
    """Work that arrives when ``arrive`` is called (and says so, as engines do); a step
    takes no time."""

    def __init__(self):
        self.geometry = SimpleNamespace(chunk_ms=160)
        self.ready = False
        self.waited: float | None = None
        self._arrived = 0.0

    def arrive(self) -> None:
        self._arrived, self.ready = time.monotonic(), True
        self.on_work()

    def has_work(self) -> bool:
        return self.ready

    def due_in_s(self) -> None:
        return None

    def step(self):
        self.ready, self.waited = False, time.monotonic() - self._arrived
        return SimpleNamespace(chunk_latencies=())


class _LongTts(_AlternatingTts):
    """``steps`` TTS steps of 200 ms each, with plenty of audio ahead."""

    def __init__(self, steps: int):
        super().__init__()
        self.left = steps
        self.stepping = threading.Event()

    def queue_state(self):
        return SimpleNamespace(**{**vars(super().queue_state()), "has_work": self.left > 0, "min_ahead_s": 3.0})

    def step(self):
        self.stepping.set()
        self.left -= 1
        time.sleep(0.2)
        return SimpleNamespace(synthesis_gaps=0, text_gaps=0)


def test_a_models_wait_counts_from_its_works_arrival_not_from_when_a_decision_saw_it():
    scheduler = GpuScheduler()
    asr, tts = _ToldAsr(), _LongTts(steps=1)
    scheduler.driver("asr")(asr, lambda stats: None)
    scheduler.driver("tts")(tts, lambda stats: None)
    assert tts.stepping.wait(5)
    time.sleep(0.05)  # into the TTS's 200 ms unit
    asr.arrive()
    time.sleep(0.4)
    scheduler.stop()
    assert asr.waited > 0.1
    wait = scheduler.metrics.registry.get_sample_value("scheduler_wait_seconds_sum", {"model": "asr"})
    assert wait == pytest.approx(asr.waited, abs=0.02)


def test_a_unit_too_long_for_any_gap_between_chunks_waits_for_one_chunk_then_runs():
    asr, tts = _ClockedAsr(period_s=0.16, step_s=0.005), _LongTts(steps=6)
    _run(6 * (0.2 + 0.16) + 0.5, asr=asr, tts=tts)
    assert tts.left == 0, "held at every chunk"


def test_a_unit_waiting_for_its_chunk_waits_on_when_other_work_wakes_the_scheduler():
    """Each sentence the TTS is given wakes the scheduler before the chunk is due."""
    asr, tts = _ClockedAsr(period_s=0.16, step_s=0.005), _LongTts(steps=8)
    told = threading.Event()

    def tell_of_work():
        while not told.wait(0.03):
            tts.on_work()

    threading.Thread(target=tell_of_work, daemon=True).start()
    try:
        _run(8 * (0.2 + 0.16) + 0.5, asr=asr, tts=tts)
    finally:
        told.set()
    assert tts.left == 0
    assert max(asr.waits[1:]) < 0.1, [round(w, 3) for w in asr.waits]  # behind a TTS step: 0.2 s


class _TtsWithText(_LongTts):
    def queue_state(self):
        return SimpleNamespace(**{**vars(super().queue_state()), "text_ahead_s": 5.0})


def test_a_unit_waiting_for_its_chunk_waits_on_after_the_work_run_in_the_gap():
    asr, tts = _ClockedAsr(period_s=0.16, step_s=0.005), _TtsWithText(steps=8)
    _run(8 * (0.2 + 0.16) + 0.5, asr=asr, tts=tts, llm=_BusyLlm(unit_s=0.06))
    assert tts.left == 0
    assert max(asr.waits[1:]) < 0.1, [round(w, 3) for w in asr.waits]


class _UrgentLlm(_BusyLlm):
    def queue_state(self):
        return SimpleNamespace(first_pending=True, generating=True)


def test_holding_urgent_units_for_a_chunk_makes_it_wait_less_not_more():
    def mean_wait(targets: Targets) -> float:
        asr = _ClockedAsr(period_s=0.16, step_s=0.005)
        _run(3.0, targets, asr=asr, llm=_UrgentLlm(unit_s=0.12))
        return sum(asr.waits[3:]) / len(asr.waits[3:])

    held, free = mean_wait(Targets()), mean_wait(Targets(asr_holds=False))
    assert held < free, f"with holds a chunk waits {held * 1000:.0f} ms, without {free * 1000:.0f} ms"


class _UnreadableTts:
    def queue_state(self):
        raise ValueError("a bug in the TTS's bookkeeping")


def test_a_model_whose_queue_cannot_be_read_sits_out_and_the_others_run():
    asr = _ClockedAsr(period_s=0.05, step_s=0.001)
    _run(1.0, asr=asr, tts=_UnreadableTts())
    assert len(asr.waits) >= 15


class _ShortThenLongLlm(_BusyLlm):
    def step(self, budget_s: float | None = None) -> None:
        self.units += 1
        time.sleep(0.01 if self.units == 1 else 0.1)

    def queue_state(self):
        return SimpleNamespace(first_pending=False, generating=self.units < 2)


def test_a_unit_kind_seen_twice_is_expected_to_take_the_longer_time():
    """Few runs of a kind say little: planning with the shorter would hold a long unit's
    chunk behind it."""
    llm = _ShortThenLongLlm(unit_s=0.0)
    scheduler = _run(0.3, llm=llm)
    assert llm.units == 2
    assert scheduler.expected_seconds(QueueState())[Unit.LLM] >= 0.1


def test_no_unit_runs_while_an_engine_warms_up():
    """A warm-up captures CUDA graphs: a replay or random draw meanwhile would fail."""
    llm = _BusyLlm(unit_s=0.005)
    scheduler = GpuScheduler()
    scheduler.driver("llm")(llm, lambda stats: None)
    try:
        with EXCLUSIVE_GPU_WORK:
            before = llm.units
            time.sleep(0.3)
            during = llm.units - before
        time.sleep(0.3)
    finally:
        scheduler.stop()
    assert during == 0
    assert llm.units - before > 5, "units run again once the warm-up is over"


def test_the_scheduler_stops_at_once_while_an_engine_warms_up():
    """A host stopped while a model loads must not wait for its warm-up to end."""
    scheduler = GpuScheduler()
    scheduler.driver("llm")(_BusyLlm(unit_s=0.005), lambda stats: None)
    with EXCLUSIVE_GPU_WORK:
        stopping = threading.Thread(target=scheduler.stop)
        stopping.start()
        stopping.join(timeout=0.5)
        assert not stopping.is_alive()


class _SteadyTts(_AlternatingTts):
    """TTS work that never runs dry; each step takes 30 ms."""

    def step(self):
        time.sleep(0.03)
        self.steps += 1
        return SimpleNamespace(synthesis_gaps=0, text_gaps=0)


def test_a_hold_renewed_by_work_arriving_meanwhile_counts_once():
    """New text for the TTS wakes the thread during an idle wait for a chunk; its next
    decision holds the same unit for the same chunk, which is not another hold."""
    asr, tts = _ClockedAsr(period_s=0.05, step_s=0.002), _SteadyTts()
    scheduler = GpuScheduler()
    scheduler.driver("asr")(asr, lambda stats: None)
    scheduler.driver("tts")(tts, lambda stats: None)
    stop = threading.Event()

    def text_arriving() -> None:
        while not stop.wait(0.002):
            tts.on_work()

    poker = threading.Thread(target=text_arriving)
    poker.start()
    time.sleep(1.5)
    stop.set()
    poker.join()
    scheduler.stop()
    holds = scheduler.metrics.registry.get_sample_value("scheduler_holds_total")
    assert holds >= 5, "the scenario holds the TTS for chunks"
    # One hold per chunk at most; the last may still be under way when the scheduler stops.
    assert holds <= len(asr.waits) + 1, f"{holds:.0f} holds for {len(asr.waits)} chunks"
