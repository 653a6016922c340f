"""``python -m scheduler``: the local GPU host (ASR, TTS and LLM on one GPU scheduler)."""

from __future__ import annotations

from scheduler.host import HostSettings, LocalGpuHost
from scheduler.policy import Targets
from servers.asr.config import RIGHT_CONTEXTS, AsrServerSettings
from servers.common.cli import run_server
from servers.common.settings import EnvDefaultsParser, add_access_settings, at_least, device_name
from servers.llm.config import LLM_FLAGS, LlmServerSettings, add_llm_settings
from servers.tts.config import (
    MAX_FRAMES_PER_TOKEN_HELP,
    VOICE_NAMES_HELP,
    TtsServerSettings,
    add_sampling_settings,
    voice_names,
)


def gpu_index(device: str) -> int | None:
    """The GPU a torch device string names (cuda, auto: the first); None for the CPU."""
    if device == "cpu":
        return None
    _, _, index = device.partition(":")
    return int(index or 0)


def llm_placement(device: str, main_gpu: int | None, gpu_layers: int) -> dict:
    """Where llama.cpp runs: on the host's device unless ``--llm-main-gpu`` names a GPU
    (with ``--device cpu``, a CUDA build would otherwise offload to every visible GPU)."""
    if main_gpu is not None:
        return {"main_gpu": main_gpu, "gpu_layers": gpu_layers}
    index = gpu_index(device)
    return {"main_gpu": index, "gpu_layers": gpu_layers if index is not None else 0}


def parse_settings(argv: list[str] | None = None) -> HostSettings:
    defaults = HostSettings()
    asr, tts, llm, targets = defaults.asr, defaults.tts, defaults.llm, defaults.targets
    p = EnvDefaultsParser(
        prog="python -m scheduler",
        description="ASR, TTS and an OpenAI-compatible LLM in one process, sharing one GPU through a scheduler.",
        env_prefix="HOST_",
    )
    p.add_setting("--host", "127.0.0.1", "address every endpoint binds; 0.0.0.0 exposes them to the network")
    p.add_setting(
        "--device",
        "auto",
        "the GPU (cuda, cuda:N, cpu or auto); the LLM's too (cpu: no layers offloaded) unless --llm-main-gpu names one",
        type=device_name,
    )
    p.add_setting("--asr-model", asr.model, "ASR: Hugging Face name or .nemo path")
    p.add_setting("--asr-port", asr.port, "ASR WebSocket port", type=int)
    p.add_setting(
        "--right-context",
        asr.right_context,
        "ASR encoder right context (0, 1, 6, 13)",
        type=int,
        choices=RIGHT_CONTEXTS,
    )
    p.add_setting(
        "--asr-max-sessions",
        asr.max_sessions,
        "ASR streams at once (their state is reserved at start-up)",
        type=at_least(1),
    )
    p.add_setting(
        "--asr-cuda-graph-max-batch",
        asr.cuda_graph_max_batch,
        "ASR steps of up to this many streams replay CUDA graphs, captured at start-up (0: eager)",
        type=at_least(0),
    )
    p.add_setting("--tts-model", tts.model, "TTS: Hugging Face name or .nemo path")
    p.add_setting("--tts-codec", tts.codec, "TTS codec (default: the one the model names)")
    p.add_setting("--tts-port", tts.port, "TTS WebSocket port", type=int)
    p.add_setting(
        "--tts-max-frames-per-token",
        tts.max_frames_per_token,
        f"TTS: {MAX_FRAMES_PER_TOKEN_HELP}",
        type=at_least(0.1, float),
    )
    p.add_setting("--tts-voice-names", ",".join(tts.voice_names), f"TTS: {VOICE_NAMES_HELP}", type=voice_names)
    p.add_setting(
        "--tts-max-batch",
        tts.max_batch,
        "TTS: segments per decoder step (bounds its key/value cache)",
        type=at_least(1),
    )
    p.add_setting(
        "--tts-cuda-graph-max-batch",
        tts.cuda_graph_max_batch,
        "TTS steps of up to this many segments replay CUDA graphs, captured at start-up (0: eager)",
        type=at_least(0),
    )
    add_sampling_settings(p, tts, prefix="tts-")
    add_llm_settings(p, llm, prefix="llm-", gpu_by_default="the --device GPU, none with --device cpu")
    p.add_setting("--llm-port", llm.port, "OpenAI-compatible /v1 port", type=int)
    p.add_setting("--audio-ahead-s", targets.audio_ahead_s, "TTS audio kept ahead of each turn's playout", type=float)
    p.add_setting(
        "--text-ahead-s", targets.text_ahead_s, "speech worth of LLM text kept queued for the TTS", type=float
    )
    p.add_setting(
        "--urgent-hold-s",
        targets.urgent_hold_s,
        "a turn's first text or audio waits for an ASR chunk due at most this soon (other work waits for any)",
        type=float,
    )
    add_access_settings(p, None, "INFO")
    a = p.parse_args(argv)
    common = {"host": a.host, "auth_token": a.auth_token, "log_level": a.log_level}
    return HostSettings(
        asr=AsrServerSettings(
            model=a.asr_model,
            port=a.asr_port,
            right_context=a.right_context,
            max_sessions=a.asr_max_sessions,
            cuda_graph_max_batch=a.asr_cuda_graph_max_batch,
            device=a.device,
            **common,
        ),
        tts=TtsServerSettings(
            model=a.tts_model,
            codec=a.tts_codec,
            port=a.tts_port,
            max_frames_per_token=a.tts_max_frames_per_token,
            voice_names=a.tts_voice_names,
            max_batch=a.tts_max_batch,
            cuda_graph_max_batch=a.tts_cuda_graph_max_batch,
            temperature=a.tts_temperature,
            topk=a.tts_topk,
            cfg_scale=a.tts_cfg_scale,
            device=a.device,
            **common,
        ),
        llm=LlmServerSettings(
            port=a.llm_port,
            **{k: getattr(a, f"llm_{k}") for k in LLM_FLAGS if k not in ("main_gpu", "gpu_layers")},
            **llm_placement(a.device, a.llm_main_gpu, a.llm_gpu_layers),
            **common,
        ),
        targets=Targets(audio_ahead_s=a.audio_ahead_s, text_ahead_s=a.text_ahead_s, urgent_hold_s=a.urgent_hold_s),
        log_level=a.log_level,
    )


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    run_server(LocalGpuHost(settings), settings.log_level)


if __name__ == "__main__":
    main()
