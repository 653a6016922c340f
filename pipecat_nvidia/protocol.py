"""Wire protocol shared by the pipecat-nvidia servers and the Pipecat services.

One definition for both sides: the servers validate what clients send with these models,
and the services parse what servers send with them. Audio travels as binary WebSocket
frames; everything else is one JSON object per text frame, tagged by ``type``.
See docs/PROTOCOL.md for the conversation as a whole.
"""

from __future__ import annotations

import base64
from enum import StrEnum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1

ASR_SAMPLE_RATE = 16000
"""The ASR server takes 16 kHz mono signed 16-bit little-endian PCM."""


class _Message(BaseModel):
    """A client's message: the server refuses fields it does not know, so a typo is an
    error rather than a setting silently left out."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    def to_json(self) -> str:
        return self.model_dump_json()


class _ServerMessage(_Message):
    """A server's message: a client reads the fields it knows and passes over those a newer
    server adds (a change that breaks old clients raises ``PROTOCOL_VERSION``)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)


class ErrorCode(StrEnum):
    """Why a message was refused. Only ``fatal`` errors end the session."""

    BAD_JSON = "bad_json"
    """A text frame that is not a JSON object."""
    UNKNOWN_TYPE = "unknown_type"
    """A JSON message whose ``type`` the server does not know."""
    INVALID_MESSAGE = "invalid_message"
    """A known message type with missing, extra or out-of-range fields."""
    BAD_AUDIO = "bad_audio"
    """A binary frame that is not whole 16-bit samples (odd byte count)."""
    MESSAGE_TOO_BIG = "message_too_big"
    """A frame larger than the server's ``max_message_bytes``; it was dropped."""
    AUDIO_OVERFLOW = "audio_overflow"
    """The client sends audio (or resets) faster than the server transcribes it; the excess
    was dropped."""
    NOT_READY = "not_ready"
    """A message arrived before the server's ``ready``; it was dropped."""
    SERVER_FULL = "server_full"
    """The server is at ``max_sessions``; the connection is closed."""
    INTERNAL = "internal"
    """The server failed on this session's work: the ASR utterance ends (its text so far
    follows as a final), the TTS segment is dropped."""
    EMPTY_TEXT = "empty_text"
    """TTS: nothing speakable in the segment's text; the segment was dropped."""
    TEXT_TOO_LONG = "text_too_long"
    """TTS: the segment's text exceeds the server's limit; the segment was dropped."""
    UNKNOWN_VOICE = "unknown_voice"
    """TTS: the segment names a voice the model does not have; the segment was dropped."""
    UNKNOWN_LANGUAGE = "unknown_language"
    """TTS: the segment's language has no tokenizer in the model; the segment was dropped."""
    UNKNOWN_PRESET = "unknown_preset"
    """TTS: the segment names a stream preset the server does not have; the segment was dropped."""
    TEXT_OVERFLOW = "text_overflow"
    """TTS: the session already has the server's limit of text waiting to be spoken, or of
    open contexts; the segment was dropped."""


# ----------------------------------------------------------------------------------------
# ASR: client -> server


class AsrReset(_Message):
    """End the current utterance.

    With ``finalize`` the server pads the utterance with just enough synthetic silence for
    the encoder to emit its last word (what the client already streamed as
    ``trailing_silence_ms`` counts towards it), runs the final step at once and answers with
    the final transcript. Without it (a soft reset) the server answers with the text so far,
    drops audio it has not transcribed yet, and starts a new utterance.
    """

    type: Literal["reset"] = "reset"
    finalize: bool = True
    trailing_silence_ms: float = Field(default=0.0, ge=0.0, le=60_000.0)


# A tagged union even with one member, so an unknown "type" is told apart from bad fields.
AsrClientMessage = Annotated[Union[AsrReset], Field(discriminator="type")]  # noqa: UP007

# ----------------------------------------------------------------------------------------
# ASR: server -> client


class AsrReady(_ServerMessage):
    """Sent once per connection when the session can take audio."""

    type: Literal["ready"] = "ready"
    protocol_version: int = PROTOCOL_VERSION
    session_id: str
    model: str
    sample_rate: int = ASR_SAMPLE_RATE
    chunk_ms: float
    """Audio per streaming step: a transcript can change at most this often."""
    right_context: int
    """Encoder right context R of att_context_size [left, R]."""
    finalize_audio_ms: float
    """Trailing audio after the last word that a finalize needs: (R + 1) x 160 ms."""
    first_step_samples: int
    """Samples of an utterance (the session's audio, or the audio after a reset) before
    its first step can run; later steps run every ``step_samples`` more. A client sending
    small frames may hold audio back until these points: the server could not use it any
    sooner, and each message costs it CPU."""
    step_samples: int


class AsrTranscript(_ServerMessage):
    """The text of the current utterance: interim while it may change, final once."""

    type: Literal["transcript"] = "transcript"
    text: str
    is_final: bool
    utterance_id: int
    """Counts utterances within the session from 0; a reset starts the next one."""
    audio_ms: float
    """Utterance audio that this text covers (synthetic padding excluded)."""
    padding_ms: float = 0.0
    """Synthetic silence the server appended before the final step (finals only)."""
    rollover: bool = False
    """A final the server made on its own, ending an utterance at ``max_utterance_s`` (or
    after a failed step); every other final answers a ``reset``."""
    latency_ms: float
    """Server time from the moment the last input this text needed arrived (the chunk's
    last audio byte for an interim, the reset for a final) to sending this message."""


class ErrorMessage(_ServerMessage):
    """Either server's error. TTS errors about one segment name its context and segment."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    fatal: bool = False
    context_id: str | None = None
    segment_id: str | None = None


AsrServerMessage = Annotated[AsrReady | AsrTranscript | ErrorMessage, Field(discriminator="type")]

# ----------------------------------------------------------------------------------------
# TTS: client -> server

ContextId = Annotated[str, Field(min_length=1, max_length=128)]


class TtsSpeak(_Message):
    """Speak a segment of text as part of a context (a bot turn).

    Segments of one context are spoken in order, one after another; contexts run
    concurrently. ``stream`` sends audio as soon as the first frames exist; ``batch``
    sends a segment's audio when it is complete.
    """

    type: Literal["speak"] = "speak"
    context_id: ContextId
    segment_id: str | None = Field(default=None, max_length=128)
    """Echoed in the segment's audio and ``segment_done``; numbered 0, 1, ... if omitted."""
    text: str
    voice: str | None = None
    language: str = "en"
    mode: Literal["stream", "batch"] = "stream"
    preset: str | None = None
    """A stream preset named in ``ready``; the server's default if omitted."""
    sample_rate: int | None = Field(default=None, ge=8000, le=48000)
    """Rate of the audio sent back; the model's own rate if omitted."""


class TtsFlush(_Message):
    """No more segments for this context: ``done`` follows its last segment's audio."""

    type: Literal["flush"] = "flush"
    context_id: ContextId


class TtsCancel(_Message):
    """Stop this context now (barge-in): queued segments are dropped, the segment being
    spoken stops within one decoder step, and no audio for it follows ``cancelled``."""

    type: Literal["cancel"] = "cancel"
    context_id: ContextId


TtsClientMessage = Annotated[TtsSpeak | TtsFlush | TtsCancel, Field(discriminator="type")]

# ----------------------------------------------------------------------------------------
# TTS: server -> client


class TtsPreset(_ServerMessage):
    """How a streamed segment is cut into audio chunks."""

    first_frames: int
    """Codec frames generated before the first audio is sent."""
    chunk_frames: int
    """Codec frames per later audio chunk."""
    context_frames: int
    """Earlier frames decoded again with each chunk; at the codec's receptive field (26)
    chunks join exactly, below it approximately."""


class TtsReady(_ServerMessage):
    type: Literal["ready"] = "ready"
    protocol_version: int = PROTOCOL_VERSION
    session_id: str
    model: str
    sample_rate: int
    """The model's own output rate (used when a segment asks for none)."""
    frame_ms: float
    """Audio per codec frame."""
    voices: list[str]
    default_voice: str
    languages: list[str]
    presets: dict[str, TtsPreset]
    default_preset: str


class TtsAudio(_ServerMessage):
    """A piece of a segment's audio: mono signed 16-bit little-endian PCM."""

    type: Literal["audio"] = "audio"
    context_id: str
    segment_id: str
    sample_rate: int
    audio: str
    """Base64 of the PCM bytes."""

    @classmethod
    def from_pcm(cls, pcm: bytes, **fields) -> TtsAudio:
        return cls(audio=base64.b64encode(pcm).decode("ascii"), **fields)

    @property
    def pcm(self) -> bytes:
        return base64.b64decode(self.audio)


class TtsSegmentDone(_ServerMessage):
    type: Literal["segment_done"] = "segment_done"
    context_id: str
    segment_id: str
    audio_ms: float
    """Duration of all the audio sent for the segment."""
    first_audio_ms: float
    """From the segment's arrival (or its turn to start, if its context was busy) to its first audio."""
    decoder_steps: int
    stopped_by: Literal["end_of_speech", "max_frames"]
    """Whether the model ended the speech itself or the length cap did."""


class TtsDone(_ServerMessage):
    type: Literal["done"] = "done"
    context_id: str


class TtsCancelled(_ServerMessage):
    type: Literal["cancelled"] = "cancelled"
    context_id: str


TtsServerMessage = Annotated[
    TtsReady | TtsAudio | TtsSegmentDone | TtsDone | TtsCancelled | ErrorMessage, Field(discriminator="type")
]

_asr_client_adapter: TypeAdapter[AsrClientMessage] = TypeAdapter(AsrClientMessage)
_asr_server_adapter: TypeAdapter[AsrServerMessage] = TypeAdapter(AsrServerMessage)
_tts_client_adapter: TypeAdapter[TtsClientMessage] = TypeAdapter(TtsClientMessage)
_tts_server_adapter: TypeAdapter[TtsServerMessage] = TypeAdapter(TtsServerMessage)


class ProtocolError(ValueError):
    """A text frame that is not a valid message; ``code`` says which way it is wrong."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


def _parse(adapter: TypeAdapter, known_types: frozenset[str], text: str | bytes):
    """Strictly: a value of another JSON type (``"no"`` for a boolean, ``"250"`` or ``true``
    for a number) is an error, not a guess at what was meant."""
    try:
        return adapter.validate_json(text, strict=True)
    except ValidationError as e:
        kinds = {err["type"] for err in e.errors()}
        if kinds & {"json_invalid", "dict_type"}:
            raise ProtocolError(ErrorCode.BAD_JSON, "expected a JSON object") from None
        if "union_tag_not_found" in kinds:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "the message has no 'type'") from None
        if "union_tag_invalid" in kinds:
            raise ProtocolError(
                ErrorCode.UNKNOWN_TYPE, f"unknown message type; expected one of {sorted(known_types)}"
            ) from None
        detail = "; ".join(f"{'.'.join(map(str, err['loc'][1:]))}: {err['msg']}" for err in e.errors())
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, detail) from None


def parse_asr_client_message(text: str | bytes) -> AsrReset:
    return _parse(_asr_client_adapter, frozenset({"reset"}), text)


def parse_asr_server_message(text: str | bytes) -> AsrReady | AsrTranscript | ErrorMessage:
    return _parse(_asr_server_adapter, frozenset({"ready", "transcript", "error"}), text)


def parse_tts_client_message(text: str | bytes) -> TtsSpeak | TtsFlush | TtsCancel:
    return _parse(_tts_client_adapter, frozenset({"speak", "flush", "cancel"}), text)


def parse_tts_server_message(
    text: str | bytes,
) -> TtsReady | TtsAudio | TtsSegmentDone | TtsDone | TtsCancelled | ErrorMessage:
    return _parse(
        _tts_server_adapter, frozenset({"ready", "audio", "segment_done", "done", "cancelled", "error"}), text
    )
