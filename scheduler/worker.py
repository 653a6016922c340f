"""The mechanism: one thread that runs the policy's choice, one unit at a time, and
measures it.

Engines are attached as their models finish loading; each tells the scheduler when work
arrives (``on_work``). With nothing to run the thread sleeps until then, or for a short
tick while TTS audio is being played out (its urgency grows with time, not with events),
or, when the policy holds a unit for an ASR chunk, until the chunk is due.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram

from scheduler.policy import Decision, QueueState, Targets, Unit, plan
from servers.common.loading import EXCLUSIVE_GPU_WORK
from servers.common.metrics import LATENCY_BUCKETS

IDLE_TICK_S = 0.02
EXPECTED_FROM_LAST = 32
"""A unit kind's expected duration is the 90th percentile of its last this many runs."""
SIT_OUT_AFTER_FAILURE_S = 1.0
"""A model whose unit (or whose report of its queue) raised is left out of the decisions
this long: the others run meanwhile (the policy would choose it again at once), and its
error is logged about once a second, not once a loop."""


@dataclass(frozen=True)
class UnitRecord:
    unit: Unit
    started: float
    """``time.monotonic()`` when it began."""
    seconds: float


class SchedulerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.unit_seconds = Histogram(
            "scheduler_unit_seconds", "Duration of one unit of GPU work", ["unit"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.wait_seconds = Histogram(
            "scheduler_wait_seconds",
            "From a model having work to its unit starting",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.holds = Counter(
            "scheduler_holds", "Times the GPU idled for a due ASR chunk instead of starting a unit", registry=r
        )
        self.deadline_misses = Counter(
            "scheduler_deadline_misses",
            "ASR chunks transcribed later than one chunk period; turns whose listener ran out of audio before "
            "more came, for the TTS when its synthesis was late, for the LLM when the text was",
            ["model"],
            registry=r,
        )

    def expose_in(self, registry: CollectorRegistry) -> None:
        """Also serve these metrics from another server's ``/metrics``."""
        for metric in (self.unit_seconds, self.wait_seconds, self.holds, self.deadline_misses):
            registry.register(metric)


@dataclass
class _Attached:
    engine: Any
    on_step: Callable[[Any], None]
    waiting_since: float | None = None
    """When its pending work arrived (None: it has none), as the engine told it
    (``on_work``), or else as a decision first saw it."""


class GpuScheduler:
    def __init__(self, targets: Targets | None = None, metrics: SchedulerMetrics | None = None, history: int = 10000):
        self.targets = targets or Targets()
        self.metrics = metrics or SchedulerMetrics()
        self.history: deque[UnitRecord] = deque(maxlen=history)
        """The latest units run, oldest first (for tests, benchmarks and debugging)."""
        self._engines: dict[str, _Attached] = {}
        self._durations: dict[tuple[Unit, bool, bool], deque[float]] = defaultdict(
            lambda: deque(maxlen=EXPECTED_FROM_LAST)
        )
        """Recent unit durations by kind: the unit, and for TTS whether it was to decode
        audio and whether it was to start a segment."""
        self._idle_s = IDLE_TICK_S
        """How long the thread sleeps after a decision that ran nothing."""
        self._asr_waited = 0
        """Units run while ASR had a ready chunk, since its last step (one during which
        a chunk became ready counts: the chunk waited for it)."""
        self._holding: Unit | None = None
        """The unit waiting for a due ASR chunk, until the chunk's step (or its own model) runs."""
        self._held: Unit | None = None
        """The unit that waited for an ASR chunk, until its model runs (it waits once)."""
        self._idling_for: Unit | None = None
        """The unit the GPU idles for while its hold lasts: work arriving meanwhile wakes the
        thread, whose next decision renews the same hold (counted once)."""
        self.max_asr_wait_units = 0
        """The most units that ever ran while ASR had a ready chunk (the policy promises 1)."""
        self._sitting_out_until: dict[str, float] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def driver(self, model: str):
        """A ``servers.common.loading.Driver`` that attaches a loaded engine ("asr", "tts" or "llm")."""

        def attach(engine, on_step: Callable[[Any], None]) -> Callable[[], None]:
            with self._lock:
                # A new dict, not a changed one: the scheduler thread reads it without the lock.
                self._engines = {**self._engines, model: _Attached(engine, on_step)}
                engine.on_work = lambda: self._work_arrived(model)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="gpu-scheduler", daemon=True)
                    self._thread.start()
            self._wake.set()
            return self.stop

        return attach

    def _work_arrived(self, model: str) -> None:
        """An engine's ``on_work`` (on the thread that brought the work, or in a step)."""
        attached = self._engines.get(model)
        if attached is not None and attached.waiting_since is None:
            attached.waiting_since = time.monotonic()
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # ------------------------------------------------------------------ one decision

    def queue_state(self, now: float) -> QueueState:
        """What each model has to do at ``now``; a model sitting out (see
        ``SIT_OUT_AFTER_FAILURE_S``) shows as one not loaded."""
        asr = self._ask("asr", now, lambda a: (a.has_work(), a.due_in_s(), a.geometry.chunk_ms / 1000.0))
        tts = self._ask("tts", now, lambda engine: engine.queue_state())
        llm = self._ask("llm", now, lambda engine: engine.queue_state())
        asr_ready, asr_due, asr_period = asr or (False, None, None)
        return QueueState(
            asr_ready=asr_ready,
            asr_waited_units=self._asr_waited,
            asr_due_s=asr_due,
            asr_period_s=asr_period,
            llm_first_pending=llm is not None and llm.first_pending,
            llm_generating=llm is not None and llm.generating,
            tts_first_pending=tts is not None and tts.first_audio_pending,
            tts_has_work=tts is not None and tts.has_work,
            tts_min_ahead_s=tts.min_ahead_s if tts else None,
            tts_text_ahead_s=tts.text_ahead_s if tts else None,
            tts_next_decodes=tts is not None and tts.next_step_decodes,
            tts_next_starts=tts is not None and tts.next_step_starts,
            held=self._held,
            holding=self._holding,
        )

    def _ask(self, model: str, now: float, question: Callable[[Any], Any]) -> Any:
        """``question`` of the model's engine; None if it is not loaded, sits out, or raised
        (it then sits out: a bug in one model must not stop the GPU work of the others)."""
        attached = self._engines.get(model)
        if attached is None or self._sitting_out_until.get(model, 0.0) > now:
            return None
        try:
            return question(attached.engine)
        except Exception:  # noqa: BLE001 - logged; the others' work goes on
            logger.exception(f"Reading the {model} engine's queue failed")
            self._sit_out(model)
            return None

    def _sit_out(self, model: str) -> None:
        self._sitting_out_until[model] = time.monotonic() + SIT_OUT_AFTER_FAILURE_S

    def _asr_ready(self) -> bool:
        return bool(self._ask("asr", time.monotonic(), lambda engine: engine.has_work()))

    @staticmethod
    def _kind(unit: Unit, state: QueueState) -> tuple[Unit, bool, bool]:
        """A TTS step that also decodes audio, or starts a segment, takes several times one
        that does neither."""
        tts = unit.model == "tts"
        return unit, tts and state.tts_next_decodes, tts and state.tts_next_starts

    def expected_seconds(self, state: QueueState) -> dict[Unit, float]:
        """What each unit would take now: the 90th percentile of its kind's recent runs
        (nearest rank, so the longest of a kind seen only a few times)."""
        expected = {}
        for unit in Unit:
            runs = self._durations.get(self._kind(unit, state))
            if runs:
                expected[unit] = sorted(runs)[math.ceil(0.9 * len(runs)) - 1]
        return expected

    def run_once(self) -> Unit | None:
        """Choose and run one unit; None if none ran (nothing had work, the chosen unit
        waits for an ASR chunk, or an engine is warming up: see ``EXCLUSIVE_GPU_WORK``)."""
        if not EXCLUSIVE_GPU_WORK.acquire(timeout=IDLE_TICK_S):
            self._idle_s = 0.0
            return None
        try:
            return self._choose_and_run()
        finally:
            EXCLUSIVE_GPU_WORK.release()

    def _choose_and_run(self) -> Unit | None:
        now = time.monotonic()
        state = self.queue_state(now)
        if not state.asr_ready:  # e.g. its session closed: nothing waits any more
            self._asr_waited = 0
        self._note_waiting(state, now)
        decision = plan(state, self.expected_seconds(state), self.targets)
        unit = decision.unit
        self._note_hold(decision)
        self._idle_s = decision.wait_s or IDLE_TICK_S
        if decision.wait_s and decision.held is not self._idling_for:
            self.metrics.holds.inc()
        self._idling_for = decision.held if decision.wait_s else None
        if unit is None:
            return None
        attached = self._engines[unit.model]
        if attached.waiting_since is not None:
            self.metrics.wait_seconds.labels(model=unit.model).observe(now - attached.waiting_since)
            attached.waiting_since = None
        if unit is Unit.ASR:
            self.max_asr_wait_units = max(self.max_asr_wait_units, self._asr_waited)
        started = time.monotonic()
        try:
            if decision.budget_s is None:
                stats = attached.engine.step()
            else:
                stats = attached.engine.step(budget_s=decision.budget_s)
        except Exception:
            self._sit_out(unit.model)
            raise
        finally:
            self._count_asr_wait(unit, state)
        seconds = time.monotonic() - started
        self.history.append(UnitRecord(unit, started, seconds))
        if decision.budget_s is None:  # a unit cut short says nothing of a whole one
            self._durations[self._kind(unit, state)].append(seconds)
        self.metrics.unit_seconds.labels(unit=unit.value).observe(seconds)
        self._count_misses(unit, state, stats)
        attached.on_step(stats)
        return unit

    def _note_hold(self, decision: Decision) -> None:
        """A unit has waited for its chunk once the chunk's step runs, not when the hold is
        decided: a decision before then (new work woke the thread, or the work run in the
        gap has ended) must hold it again."""
        unit = decision.unit
        if unit is not None:
            if self._held is not None and unit.model == self._held.model:
                self._held = None
            if self._holding is not None and unit is Unit.ASR:
                self._held, self._holding = self._holding, None
            elif self._holding is not None and unit.model == self._holding.model:
                self._holding = None
        if decision.held is not None:
            self._holding = decision.held

    def _count_asr_wait(self, unit: Unit, state: QueueState) -> None:
        """After a unit: a chunk ready before or during it waited for it (after ASR's own
        step, none did: those left are new, or ones it could not take in that step)."""
        if unit is Unit.ASR:
            self._asr_waited = 0
        else:
            self._asr_waited += int(state.asr_ready or self._asr_ready())

    def _count_misses(self, unit: Unit, state: QueueState, stats: Any) -> None:
        if unit is Unit.ASR:
            misses = {"asr": sum(latency > state.asr_period_s for latency in stats.chunk_latencies)}
        elif unit.model == "tts":
            misses = {"tts": stats.synthesis_gaps, "llm": stats.text_gaps}
        else:
            return
        for model, count in misses.items():
            if count:
                self.metrics.deadline_misses.labels(model=model).inc(count)

    def _note_waiting(self, state: QueueState, now: float) -> None:
        has_work = {
            "asr": state.asr_ready,
            "tts": state.tts_has_work,
            "llm": state.llm_generating,
        }
        for model, attached in self._engines.items():
            if not has_work[model]:
                # Work the engine told of since the snapshot (a later stamp) still waits.
                if attached.waiting_since is not None and attached.waiting_since <= now:
                    attached.waiting_since = None
            elif attached.waiting_since is None:
                attached.waiting_since = now

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                unit = self.run_once()
            except Exception:  # noqa: BLE001 - the scheduler must outlive any one unit
                logger.exception("GPU unit failed")
                unit = None
            if unit is None:
                self._wake.wait(self._idle_s)
