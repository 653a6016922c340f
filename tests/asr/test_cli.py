"""``python -m servers.asr``: settings from flags and environment, and a real run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from servers.asr.config import AsrServerSettings, parse_settings
from tests.asr.client import transcribe_over_ws
from tests.server_process import ROOT, server_process


def test_defaults_serve_the_released_model_on_loopback(monkeypatch):
    for name in list(os.environ):
        if name.startswith("ASR_"):
            monkeypatch.delenv(name)
    assert parse_settings([]) == AsrServerSettings()
    assert AsrServerSettings().model == "nvidia/nemotron-speech-streaming-en-0.6b"
    assert AsrServerSettings().host == "127.0.0.1"


def test_environment_sets_defaults_and_flags_override_them(monkeypatch):
    monkeypatch.setenv("ASR_PORT", "9001")
    monkeypatch.setenv("ASR_RIGHT_CONTEXT", "6")
    monkeypatch.setenv("ASR_AUTH_TOKEN", "t")
    settings = parse_settings(["--port", "9002"])
    assert (settings.port, settings.right_context, settings.auth_token) == (9002, 6, "t")


def test_an_unsupported_right_context_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--right-context", "3"])
    assert "invalid choice" in capsys.readouterr().err


def test_an_unsupported_value_from_the_environment_is_refused_too(monkeypatch, capsys):
    monkeypatch.setenv("ASR_PRECISION", "int8")
    with pytest.raises(SystemExit):
        parse_settings([])
    assert "$ASR_PRECISION='int8' is not one of auto, bf16, fp16, fp32" in capsys.readouterr().err


@pytest.mark.slow
def test_help_names_the_token_variable_but_not_the_token(monkeypatch, capsys):
    """``--help`` output ends up in logs and bug reports."""
    monkeypatch.setenv("ASR_AUTH_TOKEN", "s3cret-token")
    with pytest.raises(SystemExit):
        parse_settings(["--help"])
    shown = capsys.readouterr().out
    assert "$ASR_AUTH_TOKEN" in shown and "s3cret-token" not in shown
    assert parse_settings([]).auth_token == "s3cret-token"


def test_a_log_level_is_taken_in_any_case_and_an_unknown_one_refused(capsys):
    assert parse_settings(["--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit):
        parse_settings(["--log-level", "chatty"])
    assert "invalid choice" in capsys.readouterr().err


def test_the_server_runs_from_the_command_line_and_stops_on_sigterm(tiny_asr_path, speech_int16):
    with server_process("servers.asr", "--model", str(tiny_asr_path), "--device", "cpu") as port:
        messages = asyncio.run(transcribe_over_ws(f"ws://127.0.0.1:{port}", speech_int16[16000 : 16000 * 3]))
        assert messages[-1].is_final


@pytest.mark.slow
def test_the_command_line_exits_with_an_error_for_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "servers.asr", "--model", str(tmp_path / "nope.nemo"), "--port", "0", "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 1
    assert "nope.nemo" in result.stderr
