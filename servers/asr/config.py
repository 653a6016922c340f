"""Settings of the streaming ASR server: CLI flags, each defaulting to an ``ASR_*`` variable."""

from __future__ import annotations

from dataclasses import dataclass

from servers.common.settings import DeviceSetting, EnvDefaultsParser, add_server_settings, at_least

DEFAULT_MODEL = "nvidia/nemotron-speech-streaming-en-0.6b"
RIGHT_CONTEXTS = (0, 1, 6, 13)


@dataclass(frozen=True)
class AsrServerSettings(DeviceSetting):
    model: str = DEFAULT_MODEL
    right_context: int = 1
    host: str = "127.0.0.1"
    port: int = 8080
    device: str = "auto"
    precision: str = "auto"
    max_sessions: int = 1024
    max_message_bytes: int = 1 << 20
    max_buffered_s: float = 30.0
    max_utterance_s: float = 120.0
    cuda_graph_max_batch: int = 128
    auth_token: str | None = None
    log_level: str = "INFO"


def parse_settings(argv: list[str] | None = None) -> AsrServerSettings:
    d = AsrServerSettings()
    p = EnvDefaultsParser(
        prog="python -m servers.asr",
        description="Streaming ASR over WebSocket: batched cache-aware Nemotron Speech (NeMo) inference.",
        env_prefix="ASR_",
    )
    add_server_settings(p, d, "Hugging Face model name (downloaded on first use) or path to a .nemo file")
    p.add_setting(
        "--right-context",
        d.right_context,
        "encoder right context R of [70, R]: 0, 1, 6, 13 = 80, 160, 560, 1120 ms chunks",
        type=int,
        choices=RIGHT_CONTEXTS,
    )
    p.add_setting(
        "--max-buffered-s",
        d.max_buffered_s,
        "audio a session may send ahead of transcription before audio_overflow",
        type=at_least(1.0, float),
    )
    p.add_setting(
        "--max-utterance-s",
        d.max_utterance_s,
        "an utterance this long without a reset is finalised as it stands and streaming goes on",
        type=at_least(1.0, float),
    )
    p.add_setting(
        "--cuda-graph-max-batch",
        d.cuda_graph_max_batch,
        "on CUDA, steps of up to this many sessions replay CUDA graphs (one per power-of-two batch, "
        "all captured at start-up; 0: eager NeMo)",
        type=at_least(0),
    )
    return AsrServerSettings(**vars(p.parse_args(argv)))
