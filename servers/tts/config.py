"""Settings of the Magpie TTS server: CLI flags, each defaulting to a ``TTS_*`` variable."""

from __future__ import annotations

from dataclasses import dataclass

from servers.common.settings import DeviceSetting, EnvDefaultsParser, add_server_settings, at_least

DEFAULT_MODEL = "nvidia/magpie_tts_multilingual_357m"


def voice_names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


VOICE_NAMES_HELP = "names for the baked voices, comma-separated, in order"
MAX_FRAMES_PER_TOKEN_HELP = "speech is cut after this many codec frames per text token if the model has not ended it"


@dataclass(frozen=True)
class TtsServerSettings(DeviceSetting):
    model: str = DEFAULT_MODEL
    codec: str | None = None
    host: str = "127.0.0.1"
    port: int = 8001
    device: str = "auto"
    precision: str = "auto"
    max_sessions: int = 256
    max_message_bytes: int = 1 << 20
    max_batch: int = 64
    max_text_chars: int = 2000
    max_queued_chars: int = 20_000
    max_frames_per_token: float = 6.0
    voice_names: tuple[str, ...] = ()
    temperature: float | None = None
    topk: int | None = None
    cfg_scale: float | None = None
    cuda_graph_max_batch: int = 64
    auth_token: str | None = None
    log_level: str = "INFO"


def parse_settings(argv: list[str] | None = None) -> TtsServerSettings:
    d = TtsServerSettings()
    p = EnvDefaultsParser(
        prog="python -m servers.tts",
        description="Magpie TTS over WebSocket: streamed or batch synthesis, decoder steps batched across sessions.",
        env_prefix="TTS_",
    )
    add_server_settings(p, d, "Hugging Face model name (downloaded on first use) or path to a Magpie .nemo file")
    p.add_setting("--codec", d.codec, "codec .nemo for a local checkpoint whose stored codec path moved")
    p.add_setting("--max-batch", d.max_batch, "segments advanced by one decoder step at most", type=at_least(1))
    p.add_setting("--max-text-chars", d.max_text_chars, "longest text one segment may carry", type=at_least(1))
    p.add_setting(
        "--max-queued-chars",
        d.max_queued_chars,
        "text one session may have waiting to be spoken; more gets text_overflow",
        type=at_least(1),
    )
    p.add_setting(
        "--max-frames-per-token",
        d.max_frames_per_token,
        MAX_FRAMES_PER_TOKEN_HELP,
        type=at_least(0.1, float),
    )
    p.add_setting("--voice-names", ",".join(d.voice_names), VOICE_NAMES_HELP, type=voice_names)
    add_sampling_settings(p, d)
    p.add_setting(
        "--cuda-graph-max-batch",
        d.cuda_graph_max_batch,
        "on CUDA, decoder steps of up to this many segments (their new position and code sampling), prefill and "
        "codec pieces replay CUDA graphs captured at start-up (0: eager)",
        type=at_least(0),
    )
    return TtsServerSettings(**vars(p.parse_args(argv)))


def add_sampling_settings(p: EnvDefaultsParser, d: TtsServerSettings, prefix: str = "") -> None:
    """How codes are sampled (the server's flags, and the host's with ``prefix``)."""
    p.add_setting(
        f"--{prefix}temperature",
        d.temperature,
        "sampling temperature (0: greedy); default: the checkpoint's",
        type=at_least(0.0, float),
    )
    p.add_setting(f"--{prefix}topk", d.topk, "sampling top-k; default: the checkpoint's", type=at_least(1))
    p.add_setting(
        f"--{prefix}cfg-scale", d.cfg_scale, "classifier-free guidance scale; default: the checkpoint's", type=float
    )
