from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from servers.common.nemo_logs import NEMO_LOGGER

DATA = Path(__file__).parent / "data"
SAMPLE_RATE = 16000


def pytest_configure(config):
    # NeMo logs warnings for every model it builds; keep test output readable.
    logging.getLogger(NEMO_LOGGER).setLevel(logging.ERROR)
    # One intra-op thread: the servers' engine threads, ONNX (VAD, Smart Turn) and the
    # event loop share two cores, and oversubscribed torch threads stall badly under load.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def speech_int16() -> np.ndarray:
    """18.4 s of real read speech, 16 kHz mono int16 (tests/data/README.md)."""
    audio, rate = sf.read(DATA / "harvard_16k.wav", dtype="int16")
    assert rate == SAMPLE_RATE
    return audio


@pytest.fixture(scope="session")
def speech(speech_int16) -> np.ndarray:
    """The same speech as float32 in [-1, 1), as NeMo reads audio."""
    return speech_int16.astype(np.float32) / 32768.0


@pytest.fixture(scope="session")
def tiny_tts_path(tmp_path_factory) -> Path:
    from tests.tiny_tts import build_tiny_tts_checkpoint

    return build_tiny_tts_checkpoint(tmp_path_factory.mktemp("tiny_tts"))


@pytest.fixture(scope="session")
def tiny_asr_path(tmp_path_factory, speech) -> Path:
    from tests.tiny_asr import build_tiny_asr_checkpoint

    return build_tiny_asr_checkpoint(tmp_path_factory.mktemp("tiny_asr"), torch.from_numpy(speech))


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory) -> Path:
    from servers.llm.random_model import write_random_llama_gguf

    return write_random_llama_gguf(tmp_path_factory.mktemp("tiny_llm") / "tiny-llama.gguf")


class _ServerStarter:
    """Starts servers on free loopback ports with a tiny model; stops them all after the test."""

    def __init__(self, make_server, model_path: Path, **defaults):
        self._make_server = make_server
        self._defaults = {"model": str(model_path), "port": 0, **defaults}
        self.servers = []

    async def __call__(self, wait: bool = True, **overrides):
        server = self._make_server(**{**self._defaults, **overrides})
        self.servers.append(server)
        await server.start()
        if wait:
            await server.wait_loaded()
        return server

    async def stop_all(self) -> None:
        for server in self.servers:
            await server.stop()


@pytest.fixture
async def start_asr_server(tiny_asr_path):
    from servers.asr.config import AsrServerSettings
    from servers.asr.server import AsrServer

    starter = _ServerStarter(lambda **s: AsrServer(AsrServerSettings(**s)), tiny_asr_path, device="cpu")
    yield starter
    await starter.stop_all()


@pytest.fixture
async def start_tts_server(tiny_tts_path):
    """TTS servers sampling greedily, so the same text always gives the same audio."""
    from servers.tts.config import TtsServerSettings
    from servers.tts.server import TtsServer

    starter = _ServerStarter(
        lambda **s: TtsServer(TtsServerSettings(**s)), tiny_tts_path, device="cpu", temperature=0.0
    )
    yield starter
    await starter.stop_all()


@pytest.fixture
async def start_llm_server(tiny_llm_path):
    from servers.llm.config import LlmServerSettings
    from servers.llm.server import LlmServer

    starter = _ServerStarter(
        lambda **s: LlmServer(LlmServerSettings(**s)), tiny_llm_path, context_size=1024, gpu_layers=0, threads=1
    )
    yield starter
    await starter.stop_all()


@pytest.fixture(scope="module")
async def gpu_host(tiny_asr_path, tiny_tts_path, tiny_llm_path):
    """The local GPU host (ASR, TTS, LLM on one scheduler) with tiny models on free ports,
    shared by a module's tests."""
    from scheduler.host import HostSettings, LocalGpuHost
    from servers.asr.config import AsrServerSettings
    from servers.llm.config import LlmServerSettings
    from servers.tts.config import TtsServerSettings

    settings = HostSettings(
        asr=AsrServerSettings(model=str(tiny_asr_path), port=0, device="cpu"),
        tts=TtsServerSettings(model=str(tiny_tts_path), port=0, device="cpu", temperature=0.0),
        llm=LlmServerSettings(model=str(tiny_llm_path), port=0, context_size=4096, gpu_layers=0, threads=1),
    )
    host = LocalGpuHost(settings)
    await host.start()
    try:
        await host.wait_loaded()
        yield host
    finally:
        await host.stop()
