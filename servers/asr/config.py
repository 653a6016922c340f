"""Settings of the streaming ASR server: CLI flags, each defaulting to an ``ASR_*`` variable."""

from __future__ import annotations

from dataclasses import dataclass

from servers.common.settings import EnvDefaultsParser

DEFAULT_MODEL = "nvidia/nemotron-speech-streaming-en-0.6b"
RIGHT_CONTEXTS = (0, 1, 6, 13)


@dataclass(frozen=True)
class AsrServerSettings:
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
    auth_token: str | None = None
    log_level: str = "INFO"

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def parse_settings(argv: list[str] | None = None) -> AsrServerSettings:
    d = AsrServerSettings()
    p = EnvDefaultsParser(
        prog="python -m servers.asr",
        description="Streaming ASR over WebSocket: batched cache-aware Nemotron Speech (NeMo) inference.",
        env_prefix="ASR_",
    )
    p.add_setting("--model", d.model, "Hugging Face model name (downloaded on first use) or path to a .nemo file")
    p.add_setting(
        "--right-context",
        d.right_context,
        "encoder right context R of [70, R]: 0, 1, 6, 13 = 80, 160, 560, 1120 ms chunks",
        type=int,
        choices=RIGHT_CONTEXTS,
    )
    p.add_setting("--host", d.host, "address to bind; 0.0.0.0 exposes the server to the network")
    p.add_setting("--port", d.port, "port for the WebSocket, /health and /metrics (0 picks a free one)", type=int)
    p.add_setting("--device", d.device, "cuda, cuda:N, cpu, or auto (cuda when available)")
    p.add_setting(
        "--precision",
        d.precision,
        "encoder autocast: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    p.add_setting("--max-sessions", d.max_sessions, "concurrent sessions; more are refused with server_full", type=int)
    p.add_setting(
        "--max-message-bytes",
        d.max_message_bytes,
        "largest frame accepted; larger ones get message_too_big (above 4x the connection closes)",
        type=int,
    )
    p.add_setting(
        "--max-buffered-s",
        d.max_buffered_s,
        "audio a session may send ahead of transcription before audio_overflow",
        type=float,
    )
    p.add_setting(
        "--max-utterance-s",
        d.max_utterance_s,
        "an utterance this long without a reset is finalised as it stands and streaming goes on",
        type=float,
    )
    p.add_setting("--auth-token", d.auth_token, "if set, clients must send 'Authorization: Bearer <token>'")
    p.add_setting("--log-level", d.log_level, "loguru level")
    return AsrServerSettings(**vars(p.parse_args(argv)))
