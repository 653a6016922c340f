"""The wire protocol: what parses, and which error code each bad message gets."""

import pytest

from pipecat_nvidia.protocol import (
    AsrReady,
    AsrReset,
    AsrTranscript,
    ErrorCode,
    ErrorMessage,
    ProtocolError,
    parse_asr_client_message,
    parse_asr_server_message,
)


def test_reset_defaults_to_finalize_with_no_trailing_silence():
    assert parse_asr_client_message('{"type": "reset"}') == AsrReset(finalize=True, trailing_silence_ms=0.0)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", ErrorCode.BAD_JSON),
        ("reset", ErrorCode.BAD_JSON),
        ('"reset"', ErrorCode.BAD_JSON),
        ("{}", ErrorCode.INVALID_MESSAGE),
        ('{"type": "transcript"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "reset", "trailing_silence_ms": Infinity}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "reset", "trailing_silence_ms": 1e9}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "reset", "finalize": "maybe"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "reset", "finalise": false}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "reset", "finalize": "no"}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "reset", "trailing_silence_ms": true}', ErrorCode.INVALID_MESSAGE),
        ('{"type": "reset", "trailing_silence_ms": "250"}', ErrorCode.INVALID_MESSAGE),
    ],
)
def test_bad_client_messages_get_their_error_code(text, code):
    with pytest.raises(ProtocolError) as error:
        parse_asr_client_message(text)
    assert error.value.code == code


@pytest.mark.parametrize(
    "message",
    [
        AsrReady(
            session_id="s",
            model="m",
            chunk_ms=160,
            right_context=1,
            finalize_audio_ms=320,
            first_step_samples=1536,
            step_samples=2560,
        ),
        AsrTranscript(text="hi", is_final=True, utterance_id=3, audio_ms=1200, padding_ms=120, latency_ms=9.5),
        ErrorMessage(code=ErrorCode.SERVER_FULL, message="full", fatal=True),
    ],
)
def test_server_messages_round_trip(message):
    assert parse_asr_server_message(message.to_json()) == message


def test_a_field_a_newer_server_adds_is_passed_over():
    message = AsrTranscript(text="hi", is_final=False, utterance_id=0, audio_ms=160, latency_ms=3.0)
    newer = message.to_json()[:-1] + ', "confidence": 0.9}'
    assert parse_asr_server_message(newer) == message
