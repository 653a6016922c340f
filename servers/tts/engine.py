"""Magpie TTS sessions on top of one batched decoder step: segments, turns, cancel, audio.

One engine per model. A session holds contexts (bot turns); a context speaks its segments
in order, one at a time; contexts of all sessions share each decoder step. ``step()`` is
the unit of GPU work: it starts segments whose turn has come (one batched text-encoder
call), advances every active segment by one decoder step, turns new codec frames into
audio (one batched codec call) and hands each session its messages. A cancelled context
never takes part in another step and nothing more is sent for it.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import soxr
from loguru import logger

from pipecat_nvidia.protocol import (
    ErrorCode,
    ErrorMessage,
    TtsAudio,
    TtsCancelled,
    TtsDone,
    TtsPreset,
    TtsSegmentDone,
    TtsServerMessage,
    TtsSpeak,
)
from servers.common.engine import SessionEngine
from servers.common.precision import autocast, autocast_dtype, store_weights_for_autocast
from servers.tts.codec import RECEPTIVE_FIELD_FRAMES, CodecDecoder, DecodeRequest
from servers.tts.decoder import MagpieDecoder, Sequence
from servers.tts.model import languages, voices
from servers.tts.text import TextChunk, TextPreparer, TextRejected

Sink = Callable[[TtsServerMessage], None]
"""Called with the engine's lock held, in the order messages arise: hand the message
over (e.g. to an event loop) and return; never block or call back into the engine."""

PRESETS: dict[str, TtsPreset] = {
    "fast": TtsPreset(first_frames=2, chunk_frames=4, context_frames=8),
    "balanced": TtsPreset(first_frames=4, chunk_frames=8, context_frames=RECEPTIVE_FIELD_FRAMES),
    "smooth": TtsPreset(first_frames=8, chunk_frames=16, context_frames=RECEPTIVE_FIELD_FRAMES),
}
"""Stream presets: first audio after 1 / 2 / 4 decoder steps; ``fast`` also decodes less
context per chunk (cheaper, chunk joins approximate), the others join exactly."""
DEFAULT_PRESET = "balanced"
MAX_OPEN_CONTEXTS = 64
"""Contexts a session may hold open (spoken or speaking, not yet flushed or cancelled);
Pipecat keeps one per bot turn."""


class SegmentRejected(ValueError):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class _Segment:
    context: _Context
    segment_id: str
    text: str
    language: str
    mode: str
    preset: TtsPreset
    voice: int
    output_rate: int
    queued_at: float
    """When its text came."""
    started_at: float | None
    """When it became its context's current segment (first-audio latency counts from here)."""
    chunks: list[TextChunk] | None = None
    chunk_index: int = 0
    sequence: Sequence | None = None
    sent_frames: int = 0
    """Frames of the current sequence already sent as audio."""
    sent_samples: int = 0
    steps: int = 0
    first_audio_at: float | None = None
    stopped_by: str = "end_of_speech"
    resampler: soxr.ResampleStream | None = None


@dataclass
class _Context:
    session: _Session
    context_id: str
    first_text_at: float
    """When its first segment came: the turn's first audio is timed from here."""
    segments: deque[_Segment] = field(default_factory=deque)
    numbered: int = 0
    flushed: bool = False
    cancelled: bool = False
    playout_end: float | None = None
    """When the listener's audio runs out (None before the turn's first audio). A listener
    that ran dry plays on when audio comes again: each piece plays from the later of its
    arrival and the end of the audio before it."""

    def ahead_of_playout(self, now: float) -> float | None:
        """Seconds of audio the listener still has in hand; below 0, how long it has heard
        silence (None before any audio)."""
        return None if self.playout_end is None else self.playout_end - now


class _Arrival(Enum):
    """What the listener heard just before a piece of a turn's audio came."""

    TURN_FIRST = "turn_first"
    """Nothing yet: the turn's first audio."""
    IN_TIME = "in_time"
    """The audio before it, still playing."""
    SYNTHESIS_LATE = "synthesis_late"
    """Silence, though the text had come before it."""
    TEXT_LATE = "text_late"
    """Silence, and the segment's text came only after it began."""


@dataclass
class _Session:
    sid: int
    sink: Sink
    contexts: dict[str, _Context] = field(default_factory=dict)
    closed: bool = False
    queued_chars: int = 0
    """Text of its segments not yet spoken in full."""


@dataclass(frozen=True)
class TtsQueueState:
    """What a scheduler needs to know of the engine's pending work."""

    has_work: bool
    first_audio_pending: bool
    """Some turn has started and has no audio yet."""
    min_ahead_s: float | None
    """The least audio ahead of playout among turns being played."""
    text_ahead_s: float | None
    """The least speech still queued as text among turns that may get more (estimated; 0 for
    one that has spoken all it has; None: no turn waits for text)."""
    next_step_decodes: bool = False
    """The next step will probably also turn frames into audio (a longer step)."""
    next_step_starts: bool = False
    """The next step also starts a segment (its text encoder and voice context: longer too)."""


SPEECH_CHARS_PER_SECOND = 14.0
"""For estimating how much speech queued text will make."""


def _speech_left_s(context: _Context) -> float:
    """The speech its text will still make (estimated): the audio its current segment
    has sent already is spoken, not waiting."""
    if not context.segments:
        return 0.0
    current, *later = context.segments
    left = max(0.0, len(current.text) / SPEECH_CHARS_PER_SECOND - current.sent_samples / current.output_rate)
    return left + sum(len(s.text) for s in later) / SPEECH_CHARS_PER_SECOND


@dataclass(frozen=True)
class TtsStepStats:
    """What one ``step()`` did, for metrics and for the scheduler's planning."""

    batch_size: int
    started: int
    seconds: float
    audio_seconds: float
    """Audio produced by this step's codec decode (model rate)."""
    step_audio_seconds: float
    """Audio one decoder step adds to each segment (real time is kept while steps are faster)."""
    first_audio_latencies: tuple[float, ...]
    """For each turn that got its first audio in this step: seconds since its first text."""
    synthesis_gaps: int
    """Turns whose audio came again in this step after their listener had run dry with
    the text already here: the synthesis was late."""
    text_gaps: int
    """Turns whose audio came again after their listener had run dry waiting for the
    segment's text: the text (the LLM) was late."""


class TTSEngine(SessionEngine):
    """Batched Magpie synthesis for many sessions of one model."""

    def __init__(
        self,
        model,
        *,
        voice_names: list[str] | None = None,
        max_sessions: int = 256,
        max_batch: int = 64,
        max_text_chars: int = 2000,
        max_queued_chars: int = 20_000,
        max_frames_per_token: float = 6.0,
        min_frames: int = 20,
        use_cfg: bool = True,
        precision: str = "auto",
        graph_max_batch: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``clock`` tells the engine the time (listeners' playout is reckoned with it).
        Under bf16 the model's layers keep their weights in bf16 (codec aside): the model
        must not run outside the engine afterwards.
        ``graph_max_batch`` > 0: steps of up to that many segments replay CUDA graphs
        (decoder, code sampling, codec pieces), captured in ``warm_up``."""
        self.model = model
        self._clock = clock
        self.voices = voices(model, voice_names)
        self.languages = languages(model)
        self.sample_rate = int(model.output_sample_rate)
        self._max_batch = max_batch
        self._max_queued_chars = max_queued_chars
        self._max_frames_per_token = max_frames_per_token
        self._min_frames = min_frames
        self._max_frames = int(model.inference_parameters.max_decoder_steps)
        self._text = TextPreparer(model, max_text_chars)
        self._device = next(model.parameters()).device
        self._autocast = autocast_dtype(precision, self._device)
        # The codec decodes outside autocast, in float32.
        if freed := store_weights_for_autocast(model, self._autocast, skip=(model._codec_helper.codec_model,)):
            logger.info(f"TTS weights stored in {self._autocast}: {freed / 2**30:.2f} GiB freed")
        self._decoder = MagpieDecoder(
            model, use_cfg=use_cfg, autocast_dtype=self._autocast, graph_max_batch=graph_max_batch
        )
        self._decoder.reserve(max_batch, self._max_frames, self._text.max_tokens)
        self._codec = CodecDecoder(model, use_graphs=graph_max_batch > 0)
        self.frame_ms = 1000.0 * self._codec.samples_per_frame / self.sample_rate
        self._step_seconds = _Average()
        self._decode_seconds = _Average()
        super().__init__(max_sessions)
        self._busy: deque[_Context] = deque()
        """Contexts with segments to speak, oldest first (the order segments get a row)."""

    @property
    def presets(self) -> dict[str, TtsPreset]:
        return PRESETS

    @property
    def graph_batches(self) -> dict[str, int]:
        """Largest batch each part of a step replays from CUDA graphs now; 0: eager."""
        return {**self._decoder.graph_batches, "codec": self._codec.graph_batch}

    # ------------------------------------------------------------------ sessions (any thread)

    def open_session(self, sink: Sink) -> int:
        with self._lock:
            return self._add_session_locked(lambda sid: _Session(sid, sink))

    def close_session(self, sid: int) -> None:
        with self._lock:
            session = self._sessions.pop(sid, None)
            if session is None:
                return
            session.closed = True
            for context in session.contexts.values():
                context.cancelled = True
            self._busy = deque(c for c in self._busy if not c.cancelled)

    def speak(self, sid: int, request: TtsSpeak) -> str:
        """Queue a segment; returns its segment id. Raises ``SegmentRejected`` for a voice,
        language or preset the server does not have (text is checked when it is spoken)."""
        voice = request.voice if request.voice is not None else self.voices[0]
        if voice not in self.voices:
            raise SegmentRejected(ErrorCode.UNKNOWN_VOICE, f"unknown voice {voice!r}; voices: {self.voices}")
        if request.language not in self.languages:
            raise SegmentRejected(
                ErrorCode.UNKNOWN_LANGUAGE, f"unknown language {request.language!r}; languages: {self.languages}"
            )
        preset_name = request.preset or DEFAULT_PRESET
        if preset_name not in PRESETS:
            raise SegmentRejected(ErrorCode.UNKNOWN_PRESET, f"unknown preset {preset_name!r}; presets: {list(PRESETS)}")
        with self._work:
            now = self._clock()
            session = self._sessions[sid]
            context = session.contexts.get(request.context_id)
            self._check_room(session, context, request.text)
            if context is None:
                context = session.contexts[request.context_id] = _Context(
                    session, request.context_id, first_text_at=now
                )
            session.queued_chars += _charge(request.text)
            segment_id = request.segment_id if request.segment_id is not None else str(context.numbered)
            context.numbered += 1
            context.segments.append(
                _Segment(
                    context=context,
                    segment_id=segment_id,
                    text=request.text,
                    language=request.language,
                    mode=request.mode,
                    preset=PRESETS[preset_name],
                    voice=self.voices.index(voice),
                    output_rate=request.sample_rate or self.sample_rate,
                    queued_at=now,
                    started_at=now if not context.segments else None,
                )
            )
            if context not in self._busy:
                self._busy.append(context)
            self._signal_work()
        return segment_id

    def _check_room(self, session: _Session, context: _Context | None, text: str) -> None:
        """A client may send text ahead of the speech, but not without bound: the server's
        memory is every session's."""
        if context is None and len(session.contexts) >= MAX_OPEN_CONTEXTS:
            raise SegmentRejected(
                ErrorCode.TEXT_OVERFLOW, f"{MAX_OPEN_CONTEXTS} contexts are open; flush or cancel one first"
            )
        if session.queued_chars + _charge(text) > self._max_queued_chars:
            raise SegmentRejected(
                ErrorCode.TEXT_OVERFLOW,
                f"{session.queued_chars} characters are waiting to be spoken; "
                f"{len(text)} more would exceed {self._max_queued_chars}",
            )

    def flush(self, sid: int, context_id: str) -> None:
        """After the context's last segment, send ``done`` (at once if nothing is queued)."""
        with self._lock:
            session = self._sessions[sid]
            context = session.contexts.get(context_id)
            if context is not None and context.segments:
                context.flushed = True
                return
            session.contexts.pop(context_id, None)
            session.sink(TtsDone(context_id=context_id))

    def cancel(self, sid: int, context_id: str) -> None:
        """Stop the context at once; after the ``cancelled`` this sends, nothing more for it."""
        with self._lock:
            session = self._sessions[sid]
            context = session.contexts.pop(context_id, None)
            if context is not None:
                context.cancelled = True
                session.queued_chars -= sum(_charge(segment.text) for segment in context.segments)
                if context in self._busy:
                    self._busy.remove(context)
            session.sink(TtsCancelled(context_id=context_id))

    def warm_up(self) -> None:
        """Capture the CUDA graphs before serving (no other thread may sample on the GPU
        during a capture), then speak one short segment through every kind of step: it
        checks the model end to end, on the paths clients will take."""
        self._decoder.prepare_graphs()
        self._codec.prepare_graphs()
        with self._warm_up_session("TTS") as sid:
            for mode in ("stream", "batch"):
                self.speak(sid, TtsSpeak(context_id=mode, text="Warm up.", mode=mode))
            self.run_until_idle()

    # ------------------------------------------------------------------ stepping (one thread)

    def _has_work_locked(self) -> bool:
        return bool(self._busy)

    def queue_state(self) -> TtsQueueState:
        now = self._clock()
        with self._lock:
            contexts = list(self._busy)
            first_pending = any(c.playout_end is None for c in contexts)
            ahead = [a for c in contexts if (a := c.ahead_of_playout(now)) is not None]
            # Every turn its client has not flushed may get more text: one that has spoken all
            # it has needs the LLM even while another session's turns have plenty queued.
            text = [_speech_left_s(c) for s in self._sessions.values() for c in s.contexts.values() if not c.flushed]
            current = self._batch_locked()
            decodes = any(self._decodes_after_a_step(s, now) for s in current)
            starts = any(s.sequence is None for s in current)
        return TtsQueueState(
            has_work=bool(contexts),
            first_audio_pending=first_pending,
            min_ahead_s=min(ahead) if ahead else None,
            text_ahead_s=min(text) if text else None,
            next_step_decodes=decodes,
            next_step_starts=starts,
        )

    def step(self) -> TtsStepStats:
        started = time.perf_counter()
        events: list[tuple[_Context, TtsServerMessage]] = []
        with self._lock:
            segments = self._batch_locked()
        new = [s for s in segments if s.sequence is None and self._start(s)]
        running = [s for s in segments if s.sequence is not None]
        try:
            decoding, audio = self._advance(running)
        except Exception as e:  # noqa: BLE001 - one bad batch must not stop the engine
            # Which segment broke the batch is unknown: each gets the error and its turn
            # goes on with its next segment; retrying would fail every step the same way.
            logger.exception("TTS step failed")
            for segment in running:
                self._refuse_now(segment, ErrorCode.INTERNAL, f"synthesis failed: {e}")
            running, decoding, audio = [], [], []
        # Resampling and encoding the audio happen outside the lock, which the event loop
        # takes for every message it hands the engine.
        messages = [
            self._audio_messages(segment, samples) if not segment.context.cancelled else []
            for (segment, _), samples in zip(decoding, audio)
        ]
        now = self._clock()
        latencies = []
        arrivals = Counter()
        with self._lock:
            for segment in running:
                segment.steps += 1
            for (segment, request), samples, pieces in zip(decoding, audio, messages):
                if segment.context.cancelled:
                    continue
                arrival = self._send_audio(segment, request, len(samples), pieces, now, events)
                arrivals[arrival] += 1
                if arrival is _Arrival.TURN_FIRST:
                    latencies.append(now - segment.context.first_text_at)
            for segment in running:
                sequence = segment.sequence
                if not segment.context.cancelled and sequence.done and segment.sent_frames >= sequence.speech_frames:
                    self._next_chunk(segment, events)
            # Delivered under the lock that made them: a cancel or flush, which take it,
            # comes before or after all of them.
            self._deliver_locked(events)
        if running:
            self._step_seconds.add(time.perf_counter() - started)
        return TtsStepStats(
            batch_size=len(running),
            started=len(new),
            seconds=time.perf_counter() - started,
            audio_seconds=sum(len(a) for a in audio) / self.sample_rate,
            step_audio_seconds=self._decoder.frames_per_step * self.frame_ms / 1000.0,
            first_audio_latencies=tuple(latencies),
            synthesis_gaps=arrivals[_Arrival.SYNTHESIS_LATE],
            text_gaps=arrivals[_Arrival.TEXT_LATE],
        )

    def _batch_locked(self) -> list[_Segment]:
        """This step's segments: those running go on (a step without them drops their
        cached state); rows left go to waiting turns, those of a session with fewer in the
        batch first, so that one client's many turns cannot keep another's waiting."""
        running = [c for c in self._busy if c.segments[0].sequence is not None][: self._max_batch]
        holding = Counter(c.session.sid for c in running)
        waiting = [c for c in self._busy if c.segments[0].sequence is None]
        chosen = running
        while waiting and len(chosen) < self._max_batch:
            turn = min(waiting, key=lambda c: holding[c.session.sid])  # the first of equals
            waiting.remove(turn)
            chosen.append(turn)
            holding[turn.session.sid] += 1
        return [c.segments[0] for c in chosen]

    def _advance(self, running: list[_Segment]) -> tuple[list[tuple[_Segment, DecodeRequest]], list[np.ndarray]]:
        """One decoder step for the running segments, then the audio that is due."""
        with autocast(self._device.type, self._autocast):
            self._decoder.step([s.sequence for s in running])
        # A turn cancelled during the step (read without the lock: rechecked under it) is
        # not decoded: its audio would never be sent.
        decoding = [
            (s, r) for s in running if not s.context.cancelled and (r := self._audio_due(s, self._clock())) is not None
        ]
        if not decoding:
            return [], []
        decode_started = time.perf_counter()
        audio = self._codec.decode([r for _, r in decoding])
        self._decode_seconds.add(time.perf_counter() - decode_started)
        return decoding, audio

    # ------------------------------------------------------------------ segments

    def _start(self, segment: _Segment) -> bool:
        """Give the segment's next text chunk a decoder sequence; False if it was refused."""
        if segment.chunks is None:
            try:
                segment.chunks = self._text.prepare(segment.text, segment.language)
            except TextRejected as e:
                self._refuse_now(segment, e.code, str(e))
                return False
            except Exception as e:  # noqa: BLE001 - one text must not stop the engine
                logger.exception("TTS text preparation failed")
                self._refuse_now(segment, ErrorCode.INTERNAL, f"text preparation failed: {e}")
                return False
        chunk = segment.chunks[segment.chunk_index]
        spoken_tokens = len(chunk.tokens) - 1  # EOS excluded
        max_frames = min(self._max_frames, max(self._min_frames, int(self._max_frames_per_token * spoken_tokens)))
        segment.sequence = Sequence(tokens=chunk.tokens, voice=segment.voice, max_frames=max_frames)
        return True

    def _audio_due(self, segment: _Segment, now: float) -> DecodeRequest | None:
        """The frames to turn into audio now.

        Stream mode sends the preset's first frames as soon as they exist, then chunk by
        chunk; batch mode sends a segment once it is complete. Either way, when the audio
        the listener still has in hand would run out before another step and a decode,
        the frames that exist go early, provided there are enough of them to be worth a
        decode (fewer would cost more time to make and decode than they play).
        """
        sequence = segment.sequence
        available = sequence.speech_frames
        if not self._wants_audio(segment, available, sequence.done, now):
            return None
        context = segment.preset.context_frames if segment.mode == "stream" else RECEPTIVE_FIELD_FRAMES
        bos = sequence.codes.shape[-1] - sequence.frames
        return DecodeRequest(
            codes=sequence.codes[:, bos : bos + available], start=segment.sent_frames, end=available, context=context
        )

    def _wants_audio(self, segment: _Segment, available: int, done: bool, now: float) -> bool:
        """Whether ``available`` frames of speech (``done``: all there will be) are due as audio."""
        pending = available - segment.sent_frames
        if pending <= 0:
            return False
        if segment.mode == "batch":
            due = done
        else:
            preset = segment.preset
            wanted = preset.first_frames if segment.sent_frames == 0 else preset.chunk_frames
            due = pending >= wanted or done
        return due or self._running_dry(segment, pending, now)

    def _decodes_after_a_step(self, segment: _Segment, now: float) -> bool:
        """Whether the segment's audio will probably be due after one more step (an end
        of speech before ``max_frames`` cannot be foreseen)."""
        sequence, step = segment.sequence, self._decoder.frames_per_step
        if sequence is None:
            return self._wants_audio(segment, step, False, now)
        if sequence.done:
            return self._wants_audio(segment, sequence.speech_frames, True, now)
        frames = sequence.frames + step
        return self._wants_audio(segment, min(frames, sequence.max_frames), frames >= sequence.max_frames, now)

    def _running_dry(self, segment: _Segment, frames: int, now: float) -> bool:
        if frames < self._frames_worth_a_decode():
            return False
        ahead = segment.context.ahead_of_playout(now)
        return ahead is not None and ahead < self._step_seconds.value + self._decode_seconds.value

    def _frames_worth_a_decode(self) -> float:
        """The fewest frames whose playout outlasts making them and one decode call.

        A frame plays ``frame_ms`` and takes a step over ``frames_per_step`` to make;
        a decode costs about the same however few frames it carries. With no time to
        spare per frame there is none to gain by sending early.
        """
        spare = self.frame_ms / 1000.0 - self._step_seconds.value / self._decoder.frames_per_step
        return self._decode_seconds.value / spare if spare > 0 else float("inf")

    def _send_audio(
        self, segment: _Segment, request: DecodeRequest, samples: int, pieces: list[TtsAudio], now: float, events: list
    ) -> _Arrival:
        """Queue the audio of ``samples`` model-rate samples; says what the listener heard before it."""
        segment.sent_frames = request.end
        context = segment.context
        end = context.playout_end
        if end is None:
            arrival = _Arrival.TURN_FIRST
        elif end >= now:
            arrival = _Arrival.IN_TIME
        elif segment.first_audio_at is None and segment.queued_at > end:
            arrival = _Arrival.TEXT_LATE
        else:
            arrival = _Arrival.SYNTHESIS_LATE
        context.playout_end = max(end or now, now) + samples / self.sample_rate
        if segment.first_audio_at is None:
            segment.first_audio_at = now
        events.extend((context, piece) for piece in pieces)
        return arrival

    def _audio_messages(self, segment: _Segment, samples: np.ndarray, last: bool = False) -> list[TtsAudio]:
        """The audio at the segment's rate, 16-bit, in pieces of at most a second (on the
        stepping thread, which alone touches the segment's resampler); ``last`` flushes it."""
        if segment.output_rate != self.sample_rate:
            if segment.resampler is None:
                segment.resampler = soxr.ResampleStream(self.sample_rate, segment.output_rate, 1, dtype="float32")
            samples = segment.resampler.resample_chunk(samples, last=last)
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
        segment.sent_samples += len(pcm)
        return [
            TtsAudio.from_pcm(
                pcm[begin : begin + segment.output_rate].tobytes(),
                context_id=segment.context.context_id,
                segment_id=segment.segment_id,
                sample_rate=segment.output_rate,
            )
            for begin in range(0, len(pcm), segment.output_rate)
        ]

    def _last_chunk(self, segment: _Segment) -> bool:
        return segment.chunk_index + 1 >= len(segment.chunks)

    def _next_chunk(self, segment: _Segment, events: list) -> None:
        """The sequence has ended and its audio is out: speak the segment's next text chunk,
        or finish the segment."""
        if segment.sequence.end_frame == segment.sequence.max_frames:
            segment.stopped_by = "max_frames"
        if not self._last_chunk(segment):
            # The next chunk's audio counts from nothing sent, already while it waits to
            # start (what the scheduler is told its first step will bring).
            segment.chunk_index += 1
            segment.sequence, segment.sent_frames = None, 0
            return
        self._finish(segment, events, sent=True)

    def _finish(self, segment: _Segment, events: list, sent: bool) -> None:
        """The segment is over: report it, and start the context's next segment or end
        the context (``done`` once flushed). Nothing for a cancelled context."""
        context = segment.context
        if context.cancelled:
            return
        segment.sequence = None
        if sent:
            if segment.resampler is not None:  # the resampler's last samples, before the segment's end
                events.extend(
                    (context, piece) for piece in self._audio_messages(segment, np.zeros(0, np.float32), True)
                )
            events.append(
                (
                    context,
                    TtsSegmentDone(
                        context_id=context.context_id,
                        segment_id=segment.segment_id,
                        audio_ms=1000.0 * segment.sent_samples / segment.output_rate,
                        first_audio_ms=1000.0 * ((segment.first_audio_at or self._clock()) - segment.started_at),
                        decoder_steps=segment.steps,
                        stopped_by=segment.stopped_by,
                    ),
                )
            )
        context.segments.popleft()
        context.session.queued_chars -= _charge(segment.text)
        if context.segments:
            context.segments[0].started_at = self._clock()
            return
        self._busy.remove(context)
        if context.flushed:
            del context.session.contexts[context.context_id]
            events.append((context, TtsDone(context_id=context.context_id)))

    def _refuse_now(self, segment: _Segment, code: ErrorCode, message: str) -> None:
        """Refuse the segment and tell its client at once: the segment is no longer queued,
        so a flush from now on sends ``done``, which must come after this error."""
        events: list[tuple[_Context, TtsServerMessage]] = []
        with self._lock:
            self._refuse(segment, code, message, events)
            self._deliver_locked(events)

    def _deliver_locked(self, events: list[tuple[_Context, TtsServerMessage]]) -> None:
        for context, message in events:
            if not context.cancelled:
                context.session.sink(message)

    def _refuse(self, segment: _Segment, code: ErrorCode, message: str, events: list) -> None:
        """Report the segment's error and go on with its turn's next segment (nothing for a
        cancelled turn)."""
        if segment.context.cancelled:
            return
        logger.debug(f"TTS segment {segment.segment_id} of {segment.context.context_id} refused: {message}")
        events.append(
            (
                segment.context,
                ErrorMessage(
                    code=code, message=message, context_id=segment.context.context_id, segment_id=segment.segment_id
                ),
            )
        )
        self._finish(segment, events, sent=False)


class _Average:
    """Exponential moving average of a duration, in seconds."""

    def __init__(self, weight: float = 0.2):
        self.value = 0.0
        self._weight = weight

    def add(self, seconds: float) -> None:
        self.value = seconds if self.value == 0.0 else (1 - self._weight) * self.value + self._weight * seconds


def _charge(text: str) -> int:
    """What a segment counts against a session's ``max_queued_chars``: its characters, and
    at least one, so that empty segments (refused only when spoken) cannot pile up."""
    return max(1, len(text))
