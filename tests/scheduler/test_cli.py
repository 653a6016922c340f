"""``python -m scheduler``'s settings."""

from scheduler.__main__ import parse_settings
from servers.tts.config import TtsServerSettings


def test_the_tts_length_cap_defaults_to_the_tts_servers_and_can_be_set():
    assert parse_settings([]).tts.max_frames_per_token == TtsServerSettings().max_frames_per_token
    assert parse_settings(["--tts-max-frames-per-token", "1.5"]).tts.max_frames_per_token == 1.5


def test_the_tts_length_cap_reads_its_environment_variable(monkeypatch):
    monkeypatch.setenv("HOST_TTS_MAX_FRAMES_PER_TOKEN", "2.5")
    assert parse_settings([]).tts.max_frames_per_token == 2.5
