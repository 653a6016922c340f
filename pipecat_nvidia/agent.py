"""The voice agent's pipeline: what ``bot.py`` runs on whatever transport it is given.

transport in → NemotronSTTService (Silero VAD 200 ms + Smart Turn v3 on the CPU in the
user aggregator) → LLM (the local host's OpenAI-compatible endpoint; the conversation
kept within its context) → MagpieTTSService →
transport out → optional stereo recorder → assistant aggregator. Interruptions are on:
a barge-in cancels the LLM request and the TTS turn and drops queued audio. Each turn's
voice-to-voice latency is logged and sent to the client (``pipecat_nvidia.latency``).
"""

from __future__ import annotations

import os
import time
import uuid
import wave
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from loguru import logger
from pipecat.frames.frames import LLMRunFrame
from pipecat.observers.user_bot_latency_observer import UserBotLatencyObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.audio.audio_buffer_processor import AudioBufferProcessor
from pipecat.transports.base_transport import BaseTransport

from pipecat_nvidia.history import DEFAULT_HISTORY_TOKENS
from pipecat_nvidia.latency import TurnLatencyLog
from pipecat_nvidia.llm import NemotronLLMService, reasoning_extra
from pipecat_nvidia.stt import NemotronSTTService
from pipecat_nvidia.tts import MagpieTTSService
from pipecat_nvidia.turns import user_turn_params

DEFAULT_PROMPT = (
    "You are a friendly voice assistant running locally on an NVIDIA GPU. Your answers are "
    "spoken aloud, so keep them short and conversational: one to three sentences, no lists, "
    "no markdown, no emoji."
)


@dataclass(frozen=True)
class AgentSettings:
    """Every setting has an environment variable (named in ``ENV``) and a default."""

    asr_url: str = "ws://127.0.0.1:8080"
    tts_url: str = "ws://127.0.0.1:8001"
    llm_url: str = "http://127.0.0.1:8082/v1"
    auth_token: str | None = None
    llm_model: str = "nemotron-3-nano"
    system_prompt: str = DEFAULT_PROMPT
    max_tokens: int = 300
    history_tokens: int = DEFAULT_HISTORY_TOKENS
    """The conversation the LLM gets, estimated; past it the oldest turns are dropped."""
    thinking_tokens: int | None = None
    """Reason before answering, for at most about this many tokens (None: no reasoning)."""
    voice: str | None = None
    greeting: bool = True
    """Say hello when the client connects."""
    turn_cpus: int = 1
    """Threads for Smart Turn's end-of-turn inference (on the bot's CPU)."""
    record_dir: str | None = None
    """Write each session as a stereo WAV here (user left, bot right)."""
    remote: tuple[str, ...] = field(default=())
    """The URLs that came from the environment (none: run the local GPU host)."""

    ENV = {
        "asr_url": "NVIDIA_ASR_URL",
        "tts_url": "NVIDIA_TTS_URL",
        "llm_url": "NVIDIA_LLM_URL",
        "auth_token": "NVIDIA_AUTH_TOKEN",
        "llm_model": "BOT_LLM_MODEL",
        "system_prompt": "BOT_SYSTEM_PROMPT",
        "max_tokens": "BOT_MAX_TOKENS",
        "history_tokens": "BOT_HISTORY_TOKENS",
        "thinking_tokens": "BOT_THINKING_TOKENS",
        "voice": "BOT_VOICE",
        "greeting": "BOT_GREETING",
        "turn_cpus": "BOT_TURN_CPUS",
        "record_dir": "BOT_RECORD_DIR",
    }

    LEAST = {"max_tokens": 1, "history_tokens": 2, "turn_cpus": 1}
    """The smallest value that works, where it is not 0 (a bot with none would fail later,
    on the first call, without naming the variable)."""

    HOST_PORTS = {
        "asr_url": ("HOST_ASR_PORT", "ws://{}:{}"),
        "tts_url": ("HOST_TTS_PORT", "ws://{}:{}"),
        "llm_url": ("HOST_LLM_PORT", "http://{}:{}/v1"),
    }
    """The local host's ports (its own settings): where the bot finds it when the URL is not
    set, at the address the host listens on (``HOST_HOST``; loopback when that is unset or
    every address)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AgentSettings:
        """Settings from ``env``; a value that does not parse is an error naming its variable."""
        values: dict = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in cls.ENV.items():
            raw = env.get(var)
            if raw in (None, ""):
                continue
            if types[name] in ("int", "int | None"):
                values[name] = _parse_int(var, raw, least=cls.LEAST.get(name, 0))
            elif types[name] == "bool":
                values[name] = _parse_bool(var, raw)
            else:
                values[name] = raw
        remote = tuple(n for n in ("asr_url", "tts_url", "llm_url") if n in values)
        # The host's address is its own: standalone servers beside remote ones have theirs.
        address = _local_address(env.get("HOST_HOST") if not remote else None)
        local = {}
        for name, (var, url) in cls.HOST_PORTS.items():
            if name not in values:
                given = env.get(var)
                port = _parse_int(var, given, least=1, most=65535) if given else urlsplit(getattr(cls, name)).port
                local[name] = url.format(address, port)
        if not remote and "auth_token" not in values and env.get("HOST_AUTH_TOKEN"):
            # The local host's own setting: the bot sends what its host will ask for.
            values["auth_token"] = env["HOST_AUTH_TOKEN"]
        return cls(**values, **local, remote=remote)

    @property
    def uses_local_host(self) -> bool:
        return not self.remote


def _local_address(host: str | None) -> str:
    """Where the bot reaches a local host listening on ``host`` (``HOST_HOST``): on every
    IPv4 address, at loopback; on every IPv6 one (IPv6 only, as asyncio binds it), at ::1."""
    if not host or host == "0.0.0.0":
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _parse_int(var: str, raw: str, least: int = 0, most: int | None = None) -> int:
    """A count or a port, from ``least`` to ``most``."""
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a whole number") from None
    if value < least or (most is not None and value > most):
        within = f"from {least} to {most}" if most is not None else f"at least {least}"
        raise ValueError(f"{var}={raw!r} is out of range: it must be {within}")
    return value


def _parse_bool(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{var}={raw!r} is not a yes/no value (true/false, 1/0, yes/no, on/off)")


@dataclass
class Agent:
    worker: PipelineWorker
    context: LLMContext
    latency: TurnLatencyLog
    services: tuple


def build_agent(transport: BaseTransport, settings: AgentSettings) -> Agent:
    token = settings.auth_token
    stt = NemotronSTTService(url=settings.asr_url, auth_token=token)
    llm = NemotronLLMService(
        base_url=settings.llm_url,
        api_key=token or "none",
        settings=NemotronLLMService.Settings(
            model=settings.llm_model,
            system_instruction=settings.system_prompt,
            max_tokens=settings.max_tokens,
            extra=reasoning_extra(settings.thinking_tokens) if settings.thinking_tokens is not None else {},
        ),
        history_tokens=settings.history_tokens,
    )
    tts_settings = MagpieTTSService.Settings(voice=settings.voice) if settings.voice else None
    tts = MagpieTTSService(url=settings.tts_url, auth_token=token, settings=tts_settings)
    context = LLMContext()
    user, assistant = LLMContextAggregatorPair(
        context, user_params=user_turn_params(smart_turn_cpus=settings.turn_cpus)
    )
    recorder = AudioBufferProcessor(num_channels=2) if settings.record_dir else None
    processors = [transport.input(), stt, user, llm, tts, transport.output()]
    processors += [recorder] if recorder else []
    processors.append(assistant)
    observer = UserBotLatencyObserver()
    worker = PipelineWorker(
        Pipeline(processors),
        params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
        observers=[observer],
    )
    agent = Agent(worker, context, TurnLatencyLog(observer, worker.queue_frame), (stt, llm, tts))

    @transport.event_handler("on_client_connected")
    async def on_connected(_transport, _client):
        logger.info("Client connected")
        if recorder is not None:
            await recorder.start_recording()
        if settings.greeting:
            context.add_message({"role": "user", "content": "Greet me in one short sentence."})
            await worker.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def on_disconnected(_transport, _client):
        logger.info("Client disconnected")
        await worker.cancel()

    if recorder is not None:

        @recorder.event_handler("on_audio_data")
        async def on_audio(_recorder, audio: bytes, sample_rate: int, num_channels: int):
            write_wav(Path(settings.record_dir), audio, sample_rate, num_channels)

    return agent


def write_wav(directory: Path, pcm: bytes, sample_rate: int, channels: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # Sessions may end within the same second: the name carries a random part too.
    path = directory / f"session-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm)
    logger.info(f"Recorded the session to {path}")
    return path
