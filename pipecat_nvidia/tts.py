"""MagpieTTSService: Pipecat TTS on a pipecat-nvidia Magpie TTS server.

Each bot turn is one context on the server. Pipecat cuts the LLM's text into sentences;
each sentence becomes a segment of the turn's context. In adaptive mode (the default)
the first segment of a turn is streamed, so that first audio comes as early as
possible, and later segments, which have a sentence of audio ahead of them, are made
whole (batch mode). A barge-in cancels the turn on the server, and audio still on its way
for it is dropped.

A sentence's text goes on (to the assistant's context, to RTVI clients) as its audio
starts playing, timed like a word-timestamp service's words: the text is sent to the
server long before it is spoken, and a barge-in must leave the sentences not yet heard
out of the conversation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal

from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, InterruptionFrame, TTSAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.settings import NOT_GIVEN, NotGiven, TTSSettings
from pipecat.services.tts_service import WebsocketTTSService
from pipecat.transcriptions.language import Language
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.tracing.service_decorators import traced_tts

from pipecat_nvidia.connection import ServerConnection
from pipecat_nvidia.protocol import (
    ErrorCode,
    TtsAudio,
    TtsCancel,
    TtsDone,
    TtsFlush,
    TtsSegmentDone,
    TtsSpeak,
    parse_tts_server_message,
)

Mode = Literal["adaptive", "stream", "batch"]


@dataclass
class MagpieTTSSettings(TTSSettings):
    """Settings for MagpieTTSService.

    Parameters:
        model: The server's model, filled in from its ``ready`` message.
        voice: A voice the server lists (its first when unset).
        language: Language of the text.
        mode: ``adaptive`` (stream a turn's first segment, batch the rest), ``stream`` or
            ``batch``.
        preset: Stream preset the server lists (``fast``, ``balanced``, ``smooth``); the
            server's default when unset.
    """

    mode: Mode | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    preset: str | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


@dataclass
class _Turn:
    """What the server owes a turn (a context)."""

    segments: int = 0
    """Segments sent."""
    unheard: dict[str, str] = field(default_factory=dict)
    """Text of the segments whose audio has not begun, by segment id."""
    audio_s: float = 0.0
    """Audio received so far: where the next segment's audio starts in the turn's."""
    heard_at: float = field(default_factory=time.monotonic)
    """When the server last sent something for it (or the turn last sent text)."""


class MagpieTTSService(ServerConnection, WebsocketTTSService):
    """Text-to-speech on a pipecat-nvidia Magpie TTS server (``python -m servers.tts``).

    Example::

        tts = MagpieTTSService(url="ws://localhost:8001",
                               settings=MagpieTTSService.Settings(voice="Aria"))

    Metrics: TTFB (a turn's first text to its first audio) as Pipecat's TTS services
    report it, and usage (characters) per segment.
    """

    Settings = MagpieTTSSettings
    _settings: Settings

    owed_audio_timeout_s: float = 30.0
    """A turn the server sends nothing for this long (a stalled server that still answers
    pings) is given up: longer than any one sentence takes to make in batch mode."""

    def __init__(
        self,
        *,
        url: str = "ws://localhost:8001",
        auth_token: str | None = None,
        sample_rate: int | None = None,
        settings: Settings | None = None,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            url: WebSocket URL of the TTS server.
            auth_token: Bearer token, if the server was started with ``--auth-token``.
            sample_rate: Output rate; None uses the pipeline's. The server resamples.
            settings: Runtime-updatable settings (voice, language, mode, preset).
            **kwargs: Passed to ``WebsocketTTSService`` (e.g. reconnect backoff).
        """
        default_settings = self.Settings(model=None, voice=None, language=Language.EN, mode="adaptive", preset=None)
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(
            sample_rate=sample_rate,
            push_start_frame=True,
            push_stop_frames=True,
            push_text_frames=False,
            settings=default_settings,
            **kwargs,
        )
        if self._is_streaming_tokens:
            raise ValueError(
                f"{self}: Magpie speaks whole sentences, and each text sent is a segment of its own; "
                "use TextAggregationMode.SENTENCE (the default), not TOKEN"
            )
        self._init_connection(url, auth_token, parse_tts_server_message)
        self._turns: dict[str, _Turn] = {}
        """The turns (contexts) the server still owes audio or their ``done``."""
        self._owed_contexts_task: asyncio.Task | None = None
        self._awaiting_first_audio: tuple[str, float] | None = None
        """The context whose first audio the running TTFB waits for, and when it began."""

    def can_generate_metrics(self) -> bool:
        return True

    def language_to_service_language(self, language: Language) -> str:
        """The server takes ISO 639-1 codes: ``en-US`` is spoken as ``en``."""
        return str(language.value).split("-")[0].lower()

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        await self._connect()
        self._owed_contexts_task = self.create_task(self._keep_owed_contexts_open(), "keep_owed_contexts_open")

    async def cleanup(self):
        if self._owed_contexts_task:
            await self.cancel_task(self._owed_contexts_task)
            self._owed_contexts_task = None
        await super().cleanup()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if not isinstance(frame, InterruptionFrame):
            await super().process_frame(frame, direction)
            return
        # Pipecat stops every metric on an interruption, which would report a turn cut
        # before its first audio with the wait until the user spoke as its TTFB.
        awaiting = self._awaiting_first_audio
        await self.cancel_ttfb_metrics()
        await super().process_frame(frame, direction)
        if awaiting is not None and self.audio_context_available(awaiting[0]):
            # An uninterruptible turn survives the interruption and still owes its first audio.
            self._awaiting_first_audio = awaiting
            await self.start_ttfb_metrics(start_time=awaiting[1])

    async def create_audio_context(self, context_id: str):
        """Pipecat starts a turn's TTFB as it opens the turn's context."""
        await super().create_audio_context(context_id)
        self._awaiting_first_audio = (context_id, time.time())

    async def stop_ttfb_metrics(self, *, end_time: float | None = None):
        self._awaiting_first_audio = None
        await super().stop_ttfb_metrics(end_time=end_time)

    async def _keep_owed_contexts_open(self):
        """Pipecat ends an audio context that gets nothing for ``stop_frame_timeout_s``
        (3 s) and drops what arrives for it later. A batched segment sends nothing until
        it is whole, which for a long sentence on a loaded server takes longer: a turn
        the server still owes audio is kept open."""
        while True:
            await asyncio.sleep(self._stop_frame_timeout_s / 2)
            now = time.monotonic()
            for context_id, turn in list(self._turns.items()):
                if now - turn.heard_at < self.owed_audio_timeout_s:
                    self._refresh_audio_context(context_id)
                    continue
                logger.warning(
                    f"{self}: the server sent nothing for turn {context_id} in {self.owed_audio_timeout_s:.0f} s; "
                    "giving it up"
                )
                await self._cancel_turn(context_id)

    async def _on_server_ready(self) -> None:
        """A voice, language or preset the server lacks is told now, naming what it has,
        rather than by the first sentence the bot tries to say."""
        ready, settings = self.ready, self._settings
        wanted = (
            (ErrorCode.UNKNOWN_VOICE, "voice", settings.voice or None, ready.voices),
            (ErrorCode.UNKNOWN_LANGUAGE, "language", settings.language or None, ready.languages),
            (ErrorCode.UNKNOWN_PRESET, "preset", settings.preset or None, list(ready.presets)),
        )
        for code, what, value, offered in wanted:
            if value is not None and value not in offered:
                await self.push_error(
                    f"{self}: {code.value}: the server at {self._url} has no {what} {value!r}; it has {offered}",
                    category=ErrorCategory.INVALID_REQUEST,
                )

    # ------------------------------------------------------------------ text in

    def _mode_for(self, context_id: str) -> Literal["stream", "batch"]:
        mode = self._settings.mode
        if mode == "adaptive":
            turn = self._turns.get(context_id)
            return "stream" if turn is None or turn.segments == 0 else "batch"
        return mode

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Send one sentence of the turn; its audio arrives through the receive loop."""
        if not self._is_open():
            yield ErrorFrame(error=f"{self}: the TTS server is not connected; not speaking [{text}]")
            return
        turn = self._turns.setdefault(context_id, _Turn())
        segment_id = str(turn.segments)
        request = TtsSpeak(
            context_id=context_id,
            segment_id=segment_id,
            text=text,
            voice=self._settings.voice or None,
            language=self._settings.language or "en",
            mode=self._mode_for(context_id),
            preset=self._settings.preset or None,
            sample_rate=self.sample_rate,
        )
        # Counted before the send: a send that waits for the socket has already written
        # its bytes, and a barge-in that lands then must cancel this segment too.
        turn.segments += 1
        turn.unheard[segment_id] = text
        turn.heard_at = time.monotonic()
        try:
            await self._websocket.send(request.to_json())
        except Exception as e:
            yield ErrorFrame(error=f"{self}: sending text failed: {e}")
            return
        await self.start_tts_usage_metrics(text)
        if context_id != self._turn_context_id:
            # Text outside a turn (a bare TextFrame) gets a context of its own that Pipecat
            # never completes: without a flush the server would owe it audio for ever.
            await self.flush_audio(context_id)
        yield None

    async def flush_audio(self, context_id: str | None = None):
        """The turn's text is complete: the server sends ``done`` after its last audio."""
        context_id = context_id or self.get_active_audio_context_id()
        if context_id in self._turns and self._is_open():
            try:
                await self._websocket.send(TtsFlush(context_id=context_id).to_json())
            except Exception as e:
                logger.warning(f"{self}: sending flush failed: {e}")

    async def on_audio_context_interrupted(self, context_id: str):
        """Barge-in: the turn stops on the server."""
        await self._cancel_turn(context_id)
        await super().on_audio_context_interrupted(context_id)

    async def _cancel_turn(self, context_id: str) -> None:
        """Stop the turn on the server; its late audio finds no turn and is dropped."""
        if self._turns.pop(context_id, None) is not None and self._is_open():
            try:
                await self._websocket.send(TtsCancel(context_id=context_id).to_json())
            except Exception as e:
                logger.warning(f"{self}: sending cancel failed: {e}")

    async def _record_context_audio_outcome(self, context_id: str, received_audio: bool):
        """Pipecat writes off a TTS service after a few turns in a row with no audio, and a
        written-off service stops reconnecting. A turn that ends while no server is there
        to speak it says nothing about the voice; the lost server is the reconnect loop's
        to report, and to give up on after its attempts."""
        if received_audio or self._is_open():
            await super()._record_context_audio_outcome(context_id, received_audio)

    # ------------------------------------------------------------------ server messages

    async def _on_server_message(self, message) -> None:
        turn = self._turns.get(getattr(message, "context_id", None))
        if turn is not None:
            turn.heard_at = time.monotonic()
        if isinstance(message, TtsAudio):
            if turn is None or not self.audio_context_available(message.context_id):
                return
            text = turn.unheard.pop(message.segment_id, None)
            if text is not None:
                # Played after the audio before it: told as this sentence starts.
                await self.add_word_timestamps([(text, turn.audio_s)], message.context_id)
            pcm = message.pcm
            turn.audio_s += len(pcm) / (2 * message.sample_rate)
            frame = TTSAudioRawFrame(pcm, message.sample_rate, 1, context_id=message.context_id)
            await self.append_to_audio_context(message.context_id, frame)
        elif isinstance(message, TtsDone):
            await self._end_context(message.context_id)
        elif isinstance(message, TtsSegmentDone):
            logger.debug(
                f"{self}: segment {message.segment_id} of {message.context_id}: {message.audio_ms:.0f} ms of "
                f"audio, first after {message.first_audio_ms:.0f} ms"
            )

    async def _on_connection_lost(self) -> None:
        """The server is gone and owes nothing: Pipecat has closed the turns' contexts
        (``_close_connection_contexts``), which end with what they got."""
        self._turns.clear()

    async def _end_context(self, context_id: str) -> None:
        """The turn's audio is all here: its context ends (Pipecat pushes its stop frame)."""
        self._turns.pop(context_id, None)
        if self.audio_context_available(context_id):
            await self.remove_audio_context(context_id)
