"""Wire protocol shared by the pipecat-nvidia servers and the Pipecat services.

One definition for both sides: the servers validate what clients send with these models,
and the services parse what servers send with them. Audio travels as binary WebSocket
frames; everything else is one JSON object per text frame, tagged by ``type``.
See docs/PROTOCOL.md for the conversation as a whole.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1

ASR_SAMPLE_RATE = 16000
"""The ASR server takes 16 kHz mono signed 16-bit little-endian PCM."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    def to_json(self) -> str:
        return self.model_dump_json()


class ErrorCode(str, Enum):
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
    """The client sends audio faster than the server transcribes it; the excess was dropped."""
    NOT_READY = "not_ready"
    """A message arrived before the server's ``ready``; it was dropped."""
    SERVER_FULL = "server_full"
    """The server is at ``max_sessions``; the connection is closed."""
    INTERNAL = "internal"
    """The server failed on this session's work; the utterance was dropped."""


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


class AsrReady(_Message):
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


class AsrTranscript(_Message):
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
    latency_ms: float
    """Server time from the moment the last input this text needed arrived (the chunk's
    last audio byte for an interim, the reset for a final) to sending this message."""


class AsrError(_Message):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    fatal: bool = False


AsrServerMessage = Annotated[AsrReady | AsrTranscript | AsrError, Field(discriminator="type")]

_asr_client_adapter: TypeAdapter[AsrClientMessage] = TypeAdapter(AsrClientMessage)
_asr_server_adapter: TypeAdapter[AsrServerMessage] = TypeAdapter(AsrServerMessage)


class ProtocolError(ValueError):
    """A text frame that is not a valid message; ``code`` says which way it is wrong."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


def _parse(adapter: TypeAdapter, known_types: frozenset[str], text: str | bytes):
    try:
        return adapter.validate_json(text)
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


def parse_asr_server_message(text: str | bytes) -> AsrReady | AsrTranscript | AsrError:
    return _parse(_asr_server_adapter, frozenset({"ready", "transcript", "error"}), text)
