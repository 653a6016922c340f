"""Streaming ASR sessions on top of one batched step: bookkeeping, resets and results.

One engine per model. ``step()`` is the unit of GPU work: it plans one row for every
session with a ready chunk (first chunks, steady chunks and finals alike), runs them as
one ``BatchedStreamingStep``, and hands each session its transcripts. The WebSocket layer
(``server.py``) or a scheduler decides when to step; the engine never touches an event
loop, and sessions may be opened, fed and closed from any thread while a step runs.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from loguru import logger

from pipecat_nvidia.protocol import AsrServerMessage, AsrTranscript, ErrorCode, ErrorMessage
from servers.asr.batch_step import BatchedStreamingStep, StepRow
from servers.asr.encoder_graphs import GraphedEncoderStep
from servers.asr.features import UtteranceAudio
from servers.asr.model import StreamingGeometry, read_geometry, token_pieces
from servers.common.engine import SessionEngine
from servers.common.precision import autocast_dtype

Sink = Callable[[AsrServerMessage], None]

STREAMING_GAP_S = 0.1
"""A session whose last audio is older than this, and than two of its frames, is not
streaming (for ``due_in_s``)."""


MAX_WAITING_RESETS = 16
"""Resets a session may have waiting behind the one being answered: each takes a step of
its own, and a client sends one per utterance."""


class AudioOverflow(RuntimeError):
    """A session sent more audio, or more resets, than the engine holds ahead of
    transcription."""


@dataclass(frozen=True)
class _Reset:
    finalize: bool
    trailing_silence_ms: float
    received: float


@dataclass
class _Session:
    sid: int
    slot: int
    sink: Sink
    audio: UtteranceAudio
    arrivals: deque = field(default_factory=deque)
    """(utterance sample count after a push, monotonic time of that push)."""
    pushes: deque = field(default_factory=lambda: deque(maxlen=2))
    """(monotonic time, samples) of the two latest pieces of audio the client sent: the
    smaller is its pace, so that a burst (Pipecat's pre-roll as a turn starts: a second at
    once, then a step at a time) does not stretch the next arrival it expects."""
    backlog: deque = field(default_factory=deque)
    """What arrived after a pending reset: (samples, time) or another ``_Reset``."""
    backlog_samples: int = 0
    backlog_resets: int = 0
    reset: _Reset | None = None
    started: bool = False
    """The utterance's first chunk has run (the encoder has cache for it)."""
    utterance_id: int = 0
    text: str = ""
    sent_text: str = ""
    segment_start_samples: int = 0
    in_flight: bool = False
    closed: bool = False

    def buffered_samples(self) -> int:
        return self.audio.buffered_samples + self.backlog_samples

    def queue(self, item: tuple | _Reset) -> None:
        """Keep ``item`` for after the pending reset, counted (every push asks)."""
        self.backlog.append(item)
        if isinstance(item, _Reset):
            self.backlog_resets += 1
        else:
            self.backlog_samples += len(item[0])

    def unqueue(self) -> tuple | _Reset:
        item = self.backlog.popleft()
        if isinstance(item, _Reset):
            self.backlog_resets -= 1
        else:
            self.backlog_samples -= len(item[0])
        return item

    def arrival_of(self, sample_count: int) -> float:
        """When the audio up to ``sample_count`` had arrived."""
        while len(self.arrivals) > 1 and self.arrivals[0][0] < sample_count:
            self.arrivals.popleft()
        return self.arrivals[0][1] if self.arrivals else time.monotonic()


@dataclass(frozen=True)
class _Row:
    session: _Session
    step: StepRow
    ready_at: float
    """When the input this row completes arrived (for latency)."""
    padding_samples: int = 0


@dataclass(frozen=True)
class StepStats:
    """What one ``step()`` did, for metrics and for the scheduler's planning."""

    batch_size: int
    first_rows: int
    final_rows: int
    seconds: float
    chunk_latencies: tuple[float, ...]
    """Per streamed chunk: seconds from its last audio arriving to its result."""


class StreamingASREngine(SessionEngine):
    """Batched cache-aware streaming transcription for many sessions of one model."""

    def __init__(
        self,
        model,
        *,
        right_context: int,
        max_sessions: int = 1024,
        max_buffered_s: float = 30.0,
        max_utterance_s: float = 120.0,
        precision: str = "auto",
        initial_slots: int = 16,
        graph_max_batch: int = 0,
    ):
        """``graph_max_batch``: steps of up to this many sessions replay CUDA graphs
        (``servers.asr.encoder_graphs``), captured in ``warm_up``; 0 runs every step eagerly."""
        self.geometry: StreamingGeometry = read_geometry(model, right_context)
        self._max_buffered = int(max_buffered_s * self.geometry.sample_rate)
        least = self.geometry.least_buffer_samples / self.geometry.sample_rate
        if max_buffered_s < least:
            raise ValueError(
                f"max_buffered_s={max_buffered_s} cannot hold one step's audio at right context {right_context}: "
                f"allow at least {least:.2f} s, plus the client's frame size"
            )
        self._max_utterance = int(max_utterance_s * self.geometry.sample_rate)
        self._pieces = token_pieces(model)
        self._step = BatchedStreamingStep(
            model,
            self.geometry,
            max_sessions=max_sessions,
            initial_slots=initial_slots,
            autocast_dtype=autocast_dtype(precision, next(model.parameters()).device),
            graph_max_batch=graph_max_batch,
        )
        self._pool = self._step.pool
        super().__init__(max_sessions)
        self._ready: set[int] = set()
        """Sessions whose next step can run now; kept up to date so that waiting for
        work and planning cost nothing per idle session."""
        self._ended_slots: set[int] = set()
        """Slots to put back to the initial state before their next step (of new sessions
        and of utterances that ended), reset together by the next step, as it starts: a
        set, as clients that come and go while nobody streams reuse the same slots."""

    @property
    def encoder_graphs(self) -> GraphedEncoderStep | None:
        """The CUDA graphs the encoder step replays; None when every step runs eagerly."""
        return self._step.encoder_graphs

    @property
    def graph_batches(self) -> dict[str, int]:
        """Most sessions a step replays from CUDA graphs now; 0: eager (from the start, or
        since a capture failed)."""
        graphs = self._step.encoder_graphs
        return {"encoder_step": graphs.batch_limit if graphs else 0}

    # ------------------------------------------------------------------ sessions (any thread)

    def open_session(self, sink: Sink) -> int:
        with self._lock:
            sid = self._add_session_locked(
                lambda sid: _Session(sid=sid, slot=self._pool.acquire(), sink=sink, audio=self._new_audio())
            )
            self._ended_slots.add(self._sessions[sid].slot)
            return sid

    def close_session(self, sid: int) -> None:
        """Forget the session now; its slot is reused once any step running it is done."""
        with self._lock:
            session = self._sessions.pop(sid, None)
            if session is None:
                return
            session.closed = True
            self._ready.discard(sid)
            if not session.in_flight:
                self._pool.release(session.slot)

    def push_audio(self, sid: int, pcm16: bytes) -> None:
        """Queue 16-bit little-endian mono PCM for a session. An empty frame is nothing: it
        must not count as a push, which would tell the scheduler the stream went quiet."""
        if not pcm16:
            return
        samples = np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / 32768.0
        now = time.monotonic()
        with self._work:
            session = self._sessions[sid]
            if session.buffered_samples() + len(samples) > self._max_buffered:
                raise AudioOverflow(
                    f"more than {self._max_buffered / self.geometry.sample_rate:.0f} s of audio "
                    "is waiting to be transcribed"
                )
            session.pushes.append((now, len(samples)))
            if session.reset is None:
                self._append(session, samples, now)
            else:
                session.queue((samples, now))
            self._mark_if_ready(session)

    def reset(self, sid: int, finalize: bool = True, trailing_silence_ms: float = 0.0) -> None:
        """End the session's utterance after the audio pushed so far (see ``AsrReset``)."""
        request = _Reset(finalize, trailing_silence_ms, time.monotonic())
        with self._work:
            session = self._sessions[sid]
            if session.reset is None:
                session.reset = request
            elif session.backlog_resets >= MAX_WAITING_RESETS:
                raise AudioOverflow(f"{MAX_WAITING_RESETS} resets are already waiting to be answered")
            else:
                session.queue(request)
            self._mark_if_ready(session)

    def warm_up(self) -> None:
        """Run one short utterance through every kind of step before serving, then
        capture the remaining CUDA graphs: it checks the model end to end and moves
        one-time costs (allocations, kernels, captures) out of the clients' way."""
        with self._warm_up_session("ASR") as sid:
            self.push_audio(sid, bytes(2 * self.geometry.sample_rate))
            self.reset(sid, finalize=True)
            self.run_until_idle()
        self._step.prepare_decoder()
        if self._step.encoder_graphs is not None:
            self._step.encoder_graphs.prepare_all()

    def due_in_s(self) -> float | None:
        """Seconds until the first streaming session's next chunk is complete, its audio
        arriving in real time at its pace (see ``pushes``): 0 if a step could run now (or a
        frame is late), None if no session is streaming. A scheduler plans around it."""
        now = time.monotonic()
        g = self.geometry
        due = None
        with self._lock:
            if self._ready:
                return 0.0
            for session in self._sessions.values():
                if not session.pushes or session.in_flight or session.reset is not None:
                    continue
                pushed_at, frame = session.pushes[-1][0], min(samples for _, samples in session.pushes)
                if frame == 0 or now - pushed_at > max(STREAMING_GAP_S, 2 * frame / g.sample_rate):
                    continue
                needed = g.samples_for_frames(session.audio.next_frame + self._chunk_frames(session))
                frames = math.ceil((needed - session.audio.total_samples) / frame)
                at = max(0.0, pushed_at + frames * frame / g.sample_rate - now)
                due = at if due is None else min(due, at)
        return due

    # ------------------------------------------------------------------ stepping (one thread)

    def _has_work_locked(self) -> bool:
        return bool(self._ready)

    def step(self) -> StepStats:
        """Run one batched step over every session with ready work."""
        started = time.perf_counter()
        events: list[tuple[Sink, AsrServerMessage]] = []
        with self._lock:
            rows = self._plan(events)
            ended, self._ended_slots = (self._ended_slots, set()) if rows else (set(), self._ended_slots)
        tokens = None
        if rows:
            try:
                # Off the lock: on a GPU the write waits for work queued before it.
                self._pool.reset(sorted(ended))
                ended = set()
                tokens = self._step.run([r.step for r in rows]).tokens
            except Exception as e:  # noqa: BLE001 - one bad batch must not stop the engine
                logger.exception("ASR step failed")
                error = ErrorMessage(code=ErrorCode.INTERNAL, message=f"transcription failed: {e}")
            with self._lock:
                self._ended_slots |= ended  # left by a failed reset: the next step writes them
                for i, row in enumerate(rows):
                    session = row.session
                    session.in_flight = False
                    if session.closed:
                        self._pool.release(session.slot)
                    elif tokens is None:
                        # The text the client was shown stays: it becomes final (the answer
                        # to a pending reset, else one the server made on its own).
                        events.append((session.sink, error))
                        final = self._transcript(session, True, row.ready_at, rollover=session.reset is None)
                        events.append((session.sink, final))
                        self._end_utterance(session)
                    else:
                        self._after_row(row, tokens[i], events)
                        self._mark_if_ready(session)
        done = time.monotonic()
        for sink, message in events:
            sink(message)
        return StepStats(
            batch_size=len(rows),
            first_rows=sum(r.step.first for r in rows),
            final_rows=sum(r.step.final for r in rows),
            seconds=time.perf_counter() - started,
            # A failed step transcribed nothing: it has no latency to report.
            chunk_latencies=() if tokens is None else tuple(done - r.ready_at for r in rows if not r.step.final),
        )

    # ------------------------------------------------------------------ planning (under the lock)

    def _new_audio(self) -> UtteranceAudio:
        return UtteranceAudio(self.geometry)

    def _append(self, session: _Session, samples: np.ndarray, arrived: float) -> None:
        session.audio.append(samples)
        session.arrivals.append((session.audio.total_samples, arrived))

    def _padding_samples(self, reset: _Reset) -> int:
        missing_ms = max(0.0, self.geometry.finalize_audio_ms - reset.trailing_silence_ms)
        return self.geometry.ms_to_samples(missing_ms)

    def _mark_if_ready(self, session: _Session) -> None:
        # A session in flight is judged again when its step is done: until then its
        # chunk size (first or steady) and its pending reset are not yet known.
        if not session.closed and not session.in_flight and self._wants_step(session):
            self._ready.add(session.sid)
            self._signal_work()

    def _chunk_frames(self, session: _Session) -> int:
        return self.geometry.chunk_frames if session.started else self.geometry.first_chunk_frames

    def _wants_step(self, session: _Session) -> bool:
        return session.reset is not None or session.audio.ready_frames() >= self._chunk_frames(session)

    def _plan(self, events: list) -> list[_Row]:
        """One row per ready session; resets that need no model are answered here."""
        rows: list[_Row] = []
        ready = [self._sessions[sid] for sid in self._ready]
        self._ready.clear()
        for session in ready:
            reset = session.reset
            chunk = self._chunk_frames(session)
            if reset is None:
                end = self.geometry.samples_for_frames(session.audio.next_frame + chunk)
                rows.append(self._row(session, chunk, False, session.arrival_of(end)))
                continue
            padding = self._padding_samples(reset) if reset.finalize else 0
            remaining = session.audio.frames_with_padding(padding) if reset.finalize else 0
            if remaining == 0:
                events.append((session.sink, self._transcript(session, True, reset.received, all_audio=reset.finalize)))
                self._end_utterance(session)
            elif remaining <= max(chunk, self.geometry.max_final_frames):
                rows.append(self._row(session, remaining, True, reset.received, padding))
            else:
                # More than a real-time client can have buffered: a chunk now, the rest later.
                # Its wait began when its own audio came (or the reset, for padding in it).
                end = self.geometry.samples_for_frames(session.audio.next_frame + chunk)
                ready_at = session.arrival_of(end) if end <= session.audio.total_samples else reset.received
                rows.append(self._row(session, chunk, False, ready_at, padding))
        for row in rows:
            row.session.in_flight = True
        return rows

    def _row(self, session: _Session, count: int, final: bool, ready_at: float, padding: int | None = None) -> _Row:
        step = StepRow(session.slot, session.audio.take(count, padding), first=not session.started, final=final)
        return _Row(session, step, ready_at, padding or 0)

    # ------------------------------------------------------------------ results (under the lock)

    def _after_row(self, row: _Row, tokens: list[int], events: list) -> None:
        session = row.session
        session.started = True
        session.text += "".join(self._pieces[t] for t in tokens)
        if row.step.final:
            events.append(
                (session.sink, self._transcript(session, True, row.ready_at, row.padding_samples, all_audio=True))
            )
            self._end_utterance(session)
            return
        if session.text.strip() != session.sent_text:
            events.append((session.sink, self._transcript(session, False, row.ready_at)))
        segment = self._transcribed(session) - session.segment_start_samples
        if segment >= self._max_utterance:
            # Bound the text a never-ending utterance holds: the text so far becomes final
            # while the audio streams on through the same encoder state. Its last word may
            # go on in the next chunk: it opens the next segment (clients join segments with
            # a space), and a segment with no word ended yet waits for one, up to twice as long.
            words, _, last_word = session.text.rpartition(" ")
            word_ended = bool(words.strip())
            if not word_ended and segment < 2 * self._max_utterance:
                return
            if word_ended:
                session.text = words
            events.append((session.sink, self._transcript(session, True, row.ready_at, rollover=True)))
            self._next_segment(session)
            session.text = last_word if word_ended else ""
            session.segment_start_samples = self._transcribed(session)

    def _transcript(
        self,
        session: _Session,
        final: bool,
        latency_from: float,
        padding_samples: int = 0,
        all_audio: bool = False,
        rollover: bool = False,
    ) -> AsrTranscript:
        """``all_audio``: the utterance ends here, with every sample it received transcribed
        (a finalize); otherwise it covers what the encoder took."""
        g = self.geometry
        text = session.text.strip()
        session.sent_text = text
        covered = session.audio.total_samples if all_audio else self._transcribed(session)
        return AsrTranscript(
            text=text,
            is_final=final,
            utterance_id=session.utterance_id,
            audio_ms=1000.0 * (covered - session.segment_start_samples) / g.sample_rate,
            padding_ms=1000.0 * padding_samples / g.sample_rate,
            rollover=rollover,
            latency_ms=1000.0 * (time.monotonic() - latency_from),
        )

    def _transcribed(self, session: _Session) -> int:
        """Samples the encoder has taken (a client may send audio ahead of it)."""
        return min(session.audio.total_samples, session.audio.next_frame * self.geometry.hop)

    def _next_segment(self, session: _Session) -> None:
        session.utterance_id += 1
        session.text = session.sent_text = ""

    def _end_utterance(self, session: _Session) -> None:
        """Start the next utterance: fresh state (see ``_ended_slots``), then whatever
        arrived after the reset."""
        self._ended_slots.add(session.slot)
        self._next_segment(session)
        session.started = False
        session.segment_start_samples = 0
        session.audio = self._new_audio()
        session.arrivals.clear()
        session.reset = None
        while session.backlog:
            item = session.unqueue()
            if isinstance(item, _Reset):
                session.reset = item
                break
            self._append(session, *item)
        self._mark_if_ready(session)
