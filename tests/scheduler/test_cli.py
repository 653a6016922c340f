"""``python -m scheduler``'s settings."""

import pytest

from scheduler.__main__ import parse_settings
from servers.asr.config import AsrServerSettings
from servers.tts.config import TtsServerSettings


def test_the_tts_length_cap_defaults_to_the_tts_servers_and_can_be_set():
    assert parse_settings([]).tts.max_frames_per_token == TtsServerSettings().max_frames_per_token
    assert parse_settings(["--tts-max-frames-per-token", "1.5"]).tts.max_frames_per_token == 1.5


def test_the_tts_length_cap_reads_its_environment_variable(monkeypatch):
    monkeypatch.setenv("HOST_TTS_MAX_FRAMES_PER_TOKEN", "2.5")
    assert parse_settings([]).tts.max_frames_per_token == 2.5


def test_the_host_captures_asr_graphs_for_a_few_streams_not_a_servers_hundreds(monkeypatch):
    assert parse_settings([]).asr.cuda_graph_max_batch < AsrServerSettings().cuda_graph_max_batch
    assert parse_settings([]).asr.max_sessions < AsrServerSettings().max_sessions
    assert parse_settings(["--asr-max-sessions", "4"]).asr.max_sessions == 4
    assert parse_settings(["--asr-cuda-graph-max-batch", "0"]).asr.cuda_graph_max_batch == 0
    monkeypatch.setenv("HOST_ASR_CUDA_GRAPH_MAX_BATCH", "64")
    assert parse_settings([]).asr.cuda_graph_max_batch == 64


def test_how_long_a_turns_first_audio_may_wait_for_asr_can_be_set(monkeypatch):
    assert parse_settings(["--urgent-hold-s", "0"]).targets.urgent_hold_s == 0.0
    monkeypatch.setenv("HOST_URGENT_HOLD_S", "0.02")
    assert parse_settings([]).targets.urgent_hold_s == 0.02


def test_the_host_sizes_the_tts_for_a_few_sessions_not_a_servers_dozens(monkeypatch):
    settings = parse_settings([])
    assert settings.tts.max_batch < TtsServerSettings().max_batch
    assert settings.tts.cuda_graph_max_batch < TtsServerSettings().cuda_graph_max_batch
    monkeypatch.setenv("HOST_TTS_MAX_BATCH", "32")
    assert parse_settings(["--tts-cuda-graph-max-batch", "0"]).tts.cuda_graph_max_batch == 0
    assert parse_settings([]).tts.max_batch == 32


def test_the_hosts_tts_voices_can_be_named_so_the_bot_can_ask_for_one_by_name(monkeypatch):
    assert parse_settings([]).tts.voice_names == ()
    assert parse_settings(["--tts-voice-names", "Aria, Jason"]).tts.voice_names == ("Aria", "Jason")
    monkeypatch.setenv("HOST_TTS_VOICE_NAMES", "Leo,Sofia")
    assert parse_settings([]).tts.voice_names == ("Leo", "Sofia")


@pytest.mark.parametrize(("device", "main_gpu"), [("auto", 0), ("cuda", 0), ("cuda:1", 1), ("cpu", None)])
def test_the_llm_runs_on_the_hosts_gpu_alone(device, main_gpu):
    """llama.cpp's default spreads the model over every visible GPU; the host is one GPU."""
    assert parse_settings(["--device", device]).llm.main_gpu == main_gpu
    assert parse_settings(["--device", device, "--llm-main-gpu", "2"]).llm.main_gpu == 2


def test_on_the_cpu_the_llm_stays_off_every_gpu_unless_one_is_named():
    """A CUDA build of llama.cpp offloads to every visible GPU unless told to offload nothing."""
    assert parse_settings(["--device", "cpu"]).llm.gpu_layers == 0
    assert parse_settings(["--device", "cuda"]).llm.gpu_layers == -1
    assert parse_settings(["--device", "cpu", "--llm-main-gpu", "1"]).llm.gpu_layers == -1


@pytest.mark.parametrize("device", ["cuda:x", "gpu", "cuda:"])
def test_a_device_that_is_not_one_is_refused_with_the_forms_that_are(device, capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--device", device])
    assert "expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_the_hosts_tts_sampling_can_be_set_as_the_tts_servers_can():
    tts = parse_settings(["--tts-temperature", "0", "--tts-topk", "20", "--tts-cfg-scale", "2.5"]).tts
    assert (tts.temperature, tts.topk, tts.cfg_scale) == (0.0, 20, 2.5)
