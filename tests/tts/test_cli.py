"""``python -m servers.tts``: settings from flags and environment, and a real run."""

from __future__ import annotations

import asyncio
import os

import pytest
from websockets.asyncio.client import connect

from servers.tts.config import TtsServerSettings, parse_settings
from tests.server_process import server_process
from tests.tts.client import audio_of, is_done, recv_message, send, until


def test_defaults_serve_the_released_model_on_loopback(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TTS_"):
            monkeypatch.delenv(name)
    settings = parse_settings([])
    assert settings == TtsServerSettings()
    assert (settings.model, settings.host, settings.port) == ("nvidia/magpie_tts_multilingual_357m", "127.0.0.1", 8001)


def test_environment_and_flags_set_voices_and_sampling(monkeypatch):
    monkeypatch.setenv("TTS_VOICE_NAMES", "Aria, Jason")
    monkeypatch.setenv("TTS_TEMPERATURE", "0")
    settings = parse_settings(["--topk", "40"])
    assert (settings.voice_names, settings.temperature, settings.topk) == (("Aria", "Jason"), 0.0, 40)


def test_cuda_graphs_cover_every_batch_by_default_and_can_be_turned_off(monkeypatch):
    assert parse_settings([]).cuda_graph_max_batch == TtsServerSettings().max_batch
    monkeypatch.setenv("TTS_CUDA_GRAPH_MAX_BATCH", "0")
    assert parse_settings([]).cuda_graph_max_batch == 0


@pytest.mark.slow
def test_the_server_runs_from_the_command_line_with_named_voices(tiny_tts_path):
    async def speak(port):
        async with connect(f"ws://127.0.0.1:{port}") as ws:
            ready = await recv_message(ws)
            await send(ws, type="speak", context_id="c", text="Hello there.", voice="Jason")
            await send(ws, type="flush", context_id="c")
            return ready, await until(ws, is_done("c"))

    args = ("--model", str(tiny_tts_path), "--device", "cpu", "--voice-names", "Aria,Jason")
    with server_process("servers.tts", *args) as port:
        ready, messages = asyncio.run(speak(port))
    assert ready.voices == ["Aria", "Jason"]
    assert len(audio_of(messages)) > 0
