"""Driving an engine synchronously, and the offline reference it must agree with."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from pipecat_nvidia.protocol import AsrTranscript
from servers.asr.engine import StreamingASREngine
from servers.asr.model import load_streaming_model
from servers.common.worker import EngineWorker


def use_nemo_cuda_graphs_decoder(step) -> None:
    """Make ``step`` decode with NeMo's CUDA-graph label-looping decoder, run in its own
    no-graphs mode (the same code, minus the capture) so that it runs on this CPU: it
    keeps state sized for the largest batch it has seen, as on a GPU."""
    computer = step.model.decoding.decoding.decoding_computer
    computer.force_cuda_graphs_mode("no_graphs")
    step._decoder = lambda x, out_len, prev_batched_state: computer.cuda_graphs_impl(x, out_len, prev_batched_state)


def make_engine(path, right_context: int = 1, **kwargs) -> StreamingASREngine:
    model = load_streaming_model(str(path), right_context=right_context, device="cpu")
    return StreamingASREngine(model, right_context=right_context, **kwargs)


@contextmanager
def stepping_in_background(engine: StreamingASREngine):
    """The server's own worker thread steps the engine whenever it has work."""
    worker = EngineWorker(engine, "test-asr-engine")
    worker.start()
    try:
        yield
    finally:
        worker.stop()


def stream(engine, sid, pcm16: np.ndarray, piece: int = 1600) -> None:
    """Push audio in ``piece``-sample frames, stepping after each as a real-time server would."""
    for i in range(0, len(pcm16), piece):
        engine.push_audio(sid, pcm16[i : i + piece].tobytes())
        engine.run_until_idle()


def transcribe(engine, pcm16: np.ndarray, trailing_silence_ms: float = 200.0, piece: int = 1600) -> list[AsrTranscript]:
    """Every message one session gets for one finalised utterance."""
    messages: list[AsrTranscript] = []
    sid = engine.open_session(messages.append)
    stream(engine, sid, pcm16, piece)
    engine.reset(sid, finalize=True, trailing_silence_ms=trailing_silence_ms)
    engine.run_until_idle()
    engine.close_session(sid)
    return messages


def offline_text(engine: StreamingASREngine, pcm16: np.ndarray, padding_ms: float) -> str:
    """NeMo's own whole-utterance transcription of the audio plus ``padding_ms`` of silence."""
    padding = engine.geometry.ms_to_samples(padding_ms)
    audio = np.concatenate([pcm16.astype(np.float32) / 32768.0, np.zeros(padding, np.float32)])
    model = engine._step.model
    with torch.no_grad():
        text = model.transcribe([audio], batch_size=1, verbose=False)[0].text
    # NeMo 3.0's transcribe() leaves the model in training mode, where the encoder picks
    # a random attention context per call: the engine must keep streaming in eval mode.
    model.eval()
    return text
