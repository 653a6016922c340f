"""Settings of the LLM server: CLI flags, each defaulting to an ``LLM_*`` variable."""

from __future__ import annotations

from dataclasses import dataclass

from servers.common.settings import EnvDefaultsParser, add_access_settings, at_least
from servers.llm.model import DEFAULT_MODEL


@dataclass(frozen=True)
class LlmServerSettings:
    model: str = DEFAULT_MODEL
    quant: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8082
    context_size: int = 8192
    gpu_layers: int = -1
    main_gpu: int | None = None
    """Run on this GPU alone; None: llama.cpp's default, layers spread over every visible GPU."""
    threads: int | None = None
    first_segment_tokens: int = 8
    segment_tokens: int = 16
    max_tokens: int = 1024
    max_thinking_tokens: int | None = None
    """With reasoning on, the reasoning closes after about this many tokens; None: no limit."""
    max_queued: int = 16
    top_k: int = 40
    max_message_bytes: int = 4 << 20
    auth_token: str | None = None
    log_level: str = "INFO"


LLM_FLAGS = (
    "model",
    "quant",
    "context_size",
    "gpu_layers",
    "main_gpu",
    "threads",
    "first_segment_tokens",
    "segment_tokens",
    "max_tokens",
    "max_thinking_tokens",
    "max_queued",
    "top_k",
)


def add_llm_settings(
    p: EnvDefaultsParser, d: LlmServerSettings, prefix: str = "", gpu_by_default: str = "spread over every visible GPU"
) -> None:
    """The model and decoding flags (``LLM_FLAGS``; the local GPU host adds them with a
    prefix, and says where its llama.cpp runs without ``--main-gpu``: ``gpu_by_default``)."""
    p.add_setting(
        f"--{prefix}model",
        d.model,
        f"GGUF path, Hugging Face repo (quantisation chosen by --{prefix}quant) or repo:FILE-GLOB",
    )
    p.add_setting(
        f"--{prefix}quant", d.quant, "quantisation file in the repo: auto (Q8_0 with >= 64 GiB free GPU, else Q4_K_M)"
    )
    p.add_setting(
        f"--{prefix}context-size", d.context_size, "tokens of context (prompt plus answer)", type=at_least(64)
    )
    p.add_setting(f"--{prefix}gpu-layers", d.gpu_layers, "layers offloaded to the GPU (-1: all)", type=at_least(-1))
    p.add_setting(
        f"--{prefix}main-gpu",
        d.main_gpu,
        f"run on this GPU index alone (default: {gpu_by_default})",
        type=at_least(0),
    )
    p.add_setting(
        f"--{prefix}threads", d.threads, "CPU threads for llama.cpp (default: its own choice)", type=at_least(1)
    )
    p.add_setting(
        f"--{prefix}first-segment-tokens",
        d.first_segment_tokens,
        "tokens in a turn's first unit of work: short, so the TTS starts speaking early",
        type=at_least(1),
    )
    p.add_setting(f"--{prefix}segment-tokens", d.segment_tokens, "tokens in each later unit of work", type=at_least(1))
    p.add_setting(f"--{prefix}max-tokens", d.max_tokens, "answer length when a request sets none", type=at_least(1))
    p.add_setting(
        f"--{prefix}max-thinking-tokens",
        d.max_thinking_tokens,
        "with reasoning on, close the reasoning after this many tokens (at a line's end if one comes within a"
        " tenth more) when a request sets no nvext.max_thinking_tokens (default: no limit)",
        type=at_least(0),
    )
    p.add_setting(
        f"--{prefix}max-queued", d.max_queued, "requests waiting behind the running one; more get 429", type=at_least(0)
    )
    p.add_setting(
        f"--{prefix}top-k",
        d.top_k,
        "when a request samples (temperature > 0), draw from the k likeliest tokens (0: all; top_p then sorts"
        " the whole vocabulary, milliseconds of CPU a token)",
        type=at_least(0),
    )


def parse_settings(argv: list[str] | None = None) -> LlmServerSettings:
    d = LlmServerSettings()
    p = EnvDefaultsParser(
        prog="python -m servers.llm",
        description="OpenAI-compatible chat completions from a llama.cpp GGUF (Nemotron 3 Nano by default).",
        env_prefix="LLM_",
    )
    add_llm_settings(p, d)
    p.add_setting("--host", d.host, "address to bind; 0.0.0.0 exposes the server to the network")
    p.add_setting(
        "--port", d.port, "port for /v1/chat/completions, /health and /metrics (0 picks a free one)", type=int
    )
    p.add_setting("--max-message-bytes", d.max_message_bytes, "largest request body", type=at_least(1))
    add_access_settings(p, d.auth_token, d.log_level)
    return LlmServerSettings(**vars(p.parse_args(argv)))
