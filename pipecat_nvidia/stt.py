"""NemotronSTTService: Pipecat streaming STT on a pipecat-nvidia ASR server.

The service streams the transport's audio to the server while the user speaks (resampled
to 16 kHz when the pipeline runs at another rate, and sent at the server's step
boundaries rather than frame by frame: see ``step_audio``) and turns the server's interim
and final transcripts into Pipecat frames. When the VAD reports the end of speech it asks
the server to finalize, saying how much trailing silence the VAD already let through. The
server then pads only the missing part and answers at once. That final transcript is
marked ``finalized``, so the user turn closes as soon as Smart Turn agrees, without
waiting on a timer.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import numpy as np
import soxr
from loguru import logger
from pipecat.frames.frames import (
    Frame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import WebsocketSTTService
from pipecat.transcriptions.language import Language
from pipecat.utils.time import time_now_iso8601
from pipecat.utils.tracing.service_decorators import traced_stt

from pipecat_nvidia.connection import ServerConnection
from pipecat_nvidia.protocol import ASR_SAMPLE_RATE, AsrReset, AsrTranscript, parse_asr_server_message
from pipecat_nvidia.step_audio import StepAlignedAudio

NEMOTRON_TTFS_P99: float = 1.0
"""What Pipecat's turn strategy waits, from the end of speech, for a transcript that is not
marked finalized; Pipecat's own default. Ours are finalized and close a completed turn as
they arrive, but the timer also closes a turn that already holds text: the first part of a
sentence the user paused in, whose second part's final is still on its way. So it must
outlast that final's round trip plus Smart Turn's inference (~100-500 ms on a CPU, and the
final waits behind it in the aggregator's queue): 0.6 s split such a turn in two, each
answered, when the server was reached over a link of 0.45 s. Its price: a turn whose last
part gives no words (a cough after a pause) closes this long after the end of speech."""

PREROLL_SECS: float = 1.0
"""Audio from before the VAD's start that is sent with it when the service pauses between
turns. Silero reports a start about half a second into speech (its 0.2 s start window
and its confidence's rise), and the encoder needs the onset; Pipecat's
``SegmentedSTTService`` keeps the same second."""


@dataclass
class NemotronSTTSettings(STTSettings):
    """Settings for NemotronSTTService.

    Parameters:
        model: The server's model, filled in from its ``ready`` message (the server, not
            the client, decides which model runs).
        language: Language of the transcripts; the Nemotron streaming model is English.
    """


class NemotronSTTService(ServerConnection, WebsocketSTTService):
    """Streaming speech-to-text on a pipecat-nvidia ASR server (Nemotron Speech).

    Example::

        stt = NemotronSTTService(url="ws://localhost:8080")

    Pair it with :func:`pipecat_nvidia.turns.user_turn_params` (Silero VAD at 200 ms and
    Smart Turn v3 on the CPU) for the recommended turn-taking.

    Metrics: TTFB as Pipecat defines it for STT (end of speech to the finalized
    transcript). Processing time is the finalize round trip: from sending the finalize
    request at the VAD's stop to receiving the final transcript. Usage is the audio
    seconds the server received (not what was held back between turns or dropped while
    it loaded), reported with each final transcript.
    """

    Settings = NemotronSTTSettings
    _settings: Settings

    def __init__(
        self,
        *,
        url: str = "ws://localhost:8080",
        auth_token: str | None = None,
        sample_rate: int | None = None,
        ttfs_p99_latency: float | None = NEMOTRON_TTFS_P99,
        pause_between_turns: bool = True,
        preroll_secs: float = PREROLL_SECS,
        settings: Settings | None = None,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            url: WebSocket URL of the ASR server (``python -m servers.asr``).
            auth_token: Bearer token, if the server was started with ``--auth-token``.
            sample_rate: Input audio rate; None uses the pipeline's. Audio is resampled
                to the server's 16 kHz when it differs.
            ttfs_p99_latency: P99 latency from end of speech to final transcript, in
                seconds (see :data:`NEMOTRON_TTFS_P99`). Measure your deployment and pass it.
            pause_between_turns: Send no audio from the VAD's stop to its next start, then
                the last ``preroll_secs`` with the start: the server does no work for a
                user who is silent (while the bot talks, about half of a conversation).
                It takes effect once a VAD frame passes; without a VAD everything streams.
                Speech the VAD misses is then not transcribed either (Pipecat's
                transcription-based turn start cannot catch it): pass False to keep it.
            preroll_secs: See :data:`PREROLL_SECS`.
            settings: Runtime-updatable settings.
            **kwargs: Passed to ``WebsocketSTTService`` (e.g. reconnect backoff).
        """
        default_settings = self.Settings(model=None, language=Language.EN)
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(
            sample_rate=sample_rate,
            ttfs_p99_latency=ttfs_p99_latency,
            settings=default_settings,
            **kwargs,
        )
        self._init_connection(url, auth_token, parse_asr_server_message)
        self._resampler: soxr.ResampleStream | None = None
        """From the pipeline's rate to the server's, made at the first audio that needs it."""
        self._dropped_before_ready = 0
        self._held_audio: StepAlignedAudio | None = None
        """Audio held until the server can step on it (set from each connection's ``ready``)."""
        self._pause_between_turns = pause_between_turns
        self._speaking: bool | None = None
        """What the VAD said last; None before it said anything (then everything streams)."""
        self._preroll = bytearray()
        self._preroll_secs = preroll_secs
        self._after_final = False
        """A final came after the VAD's stop: interims wait for the next speech, since an
        interim would make the turn strategy wait for another finalized transcript."""
        self._finalizes_sent: deque[float] = deque()
        """``time.time()`` when each finalize still unanswered was sent, oldest first: the
        server answers each with one final, in order."""

    def can_generate_metrics(self) -> bool:
        return True

    async def _update_settings(self, delta: STTSettings) -> dict[str, Any]:
        """The server decides the model and the language it transcribes: a change here
        cannot take effect, so it is refused with a warning, and transcripts stay
        labelled with what the server does. Pipecat's base, which would take the change
        as a possible fix for a written-off service, is not asked: none was made."""
        self._warn_unhandled_updated_settings(copy.deepcopy(self._settings).apply_update(delta))
        return {}

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        await self._connect()

    # ------------------------------------------------------------------ frames

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._after_final = False
            self._speaking = True
            preroll = bytes(self._preroll)
            self._preroll.clear()
            if preroll and self._is_open():
                await self._send_audio(preroll)
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speaking = False
            await self._finalize(frame.stop_secs)

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Stream audio to the server; transcripts arrive through the receive loop."""
        if not self._is_open():
            self._dropped_before_ready += 1
            if self._dropped_before_ready == 1:
                logger.warning(f"{self}: the ASR server is not ready; dropping audio until it is")
            yield None
            return
        audio = await self._at_server_rate(audio)
        if self._pause_between_turns and self._speaking is False:
            self._preroll += audio
            del self._preroll[: max(0, len(self._preroll) - 2 * round(self._server_rate() * self._preroll_secs))]
        else:
            await self._send_audio(audio)
        yield None

    def _record_stt_audio_usage(self, audio: bytes | bytearray) -> None:
        """Pipecat's base counts every frame as it arrives, but frames held back between
        turns or dropped before the server is ready are never transcribed: ``_send_audio``
        counts what the server receives instead."""

    def _is_keepalive_ready(self) -> bool:
        return self._is_open()

    async def _send_keepalive(self, silence: bytes) -> None:
        """Only with ``keepalive_timeout`` (the server needs none: WebSocket pings keep an
        idle connection open). The silence goes the way audio goes, so that the server's
        step boundaries are still counted right."""
        await self._send_audio(await self._at_server_rate(silence))

    def _server_rate(self) -> int:
        """The rate the server announced (the model's), 16 kHz until it has."""
        return self.ready.sample_rate if self.ready is not None else ASR_SAMPLE_RATE

    async def _at_server_rate(self, audio: bytes) -> bytes:
        rate = self._server_rate()
        if self.sample_rate == rate:
            return audio
        if self._resampler is None:
            self._resampler = soxr.ResampleStream(self.sample_rate, rate, 1, dtype="int16", quality="VHQ")
        return self._resampler.resample_chunk(np.frombuffer(audio, np.int16)).tobytes()

    def _resampled_tail(self) -> bytes:
        """What the resampler holds back as look-ahead (tens of milliseconds): a finalize
        sends it, or the server would have less silence than it is told. The stream then
        starts afresh for the next utterance."""
        if self._resampler is None:
            return b""
        tail = self._resampler.resample_chunk(np.zeros(0, np.int16), last=True).tobytes()
        self._resampler.clear()
        return tail

    async def _send_audio(self, audio: bytes) -> None:
        audio = self._held_audio.add(audio)
        if not audio:
            return
        try:
            await self._send_pcm(audio)
        except Exception as e:
            await self.push_error(f"{self}: sending audio failed: {e}", exception=e)

    async def _send_pcm(self, pcm: bytes) -> None:
        """Server-rate audio to the server, counted as usage once sent."""
        await self._websocket.send(pcm)
        self._stt_usage_pending_seconds += len(pcm) / (2 * self._server_rate())

    async def _finalize(self, vad_stop_secs: float) -> None:
        if not self._is_open():
            return
        self.request_finalize()
        reset = AsrReset(finalize=True, trailing_silence_ms=1000.0 * vad_stop_secs)
        rest = self._held_audio.add(self._resampled_tail()) + self._held_audio.end_utterance()
        sent_at = time.time()
        try:
            if rest:
                await self._send_pcm(rest)
            await self._websocket.send(reset.to_json())
        except Exception as e:
            logger.warning(f"{self}: sending finalize failed: {e}")
            return
        # Measured once the final comes: one that never does (the server lost) must not
        # leave a measurement open for the next interruption to report.
        self._finalizes_sent.append(sent_at)

    # ------------------------------------------------------------------ server messages

    async def _on_server_ready(self) -> None:
        self._held_audio = StepAlignedAudio.for_server(self.ready)
        self._preroll.clear()  # from before the connection was lost: not joined to what follows
        self._resampler = None  # made afresh for this server's rate
        self._finalizes_sent.clear()  # a new connection owes no finals
        if self._dropped_before_ready:
            logger.info(f"{self}: {self._dropped_before_ready} audio frames were dropped while the server loaded")
            self._dropped_before_ready = 0

    async def _on_server_message(self, message: AsrTranscript) -> None:
        if not message.is_final:
            if message.text and not self._after_final:
                await self.push_frame(
                    InterimTranscriptionFrame(
                        message.text,
                        self._user_id,
                        time_now_iso8601(),
                        self._settings.language,
                        result=message.model_dump(),
                    )
                )
            return
        if not message.rollover and self._finalizes_sent:
            # The answer to the oldest finalize, even when a rollover final came after the
            # VAD stop. It ends the turn only if no later one waits for its own: the user
            # spoke again before this final came, and those words belong to the turn.
            await self.start_processing_metrics(start_time=self._finalizes_sent.popleft())
            await self.stop_processing_metrics()
            if not self._finalizes_sent:
                self.confirm_finalize()
        # Only while the user is silent: a final can come while they speak (a late one,
        # or the server ending a long utterance), and their words go on.
        self._after_final = self._speaking is False
        # An empty final is not pushed: a turn strategy takes a transcript's text as the
        # turn's text, and empty text would hold the turn open until its watchdog.
        if not message.text:
            return
        await self.emit_stt_usage_metrics()
        await self.push_frame(
            TranscriptionFrame(
                message.text,
                self._user_id,
                time_now_iso8601(),
                self._settings.language,
                result=message.model_dump(),
            )
        )
        await self._handle_transcription(message.text, True, self._settings.language)

    @traced_stt
    async def _handle_transcription(self, transcript: str, is_final: bool, language: str | None = None):
        """Marks a final transcript for tracing."""
