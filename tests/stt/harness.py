"""Run a real Pipecat pipeline on real speech, paced in real time, and log its frames."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from pipecat.frames.frames import (
    EndFrame,
    InputAudioRawFrame,
    MetricsFrame,
    TranscriptionFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection

from pipecat_nvidia.turns import user_turn_params
from tests.pipeline import Clock, FrameLog, run_worker

FRAME_MS = 20


@dataclass
class PipelineRun:
    """What happened: frames before the STT (``head``, where errors arrive upstream),
    between STT and the user aggregator (``near``, both ways), after it (``far``), and
    the conversation it built."""

    head: FrameLog
    near: FrameLog
    far: FrameLog
    context: LLMContext
    turn_ends: list[float] = field(default_factory=list)

    def finals(self) -> list[TranscriptionFrame]:
        return [e.frame for e in self.near.of(TranscriptionFrame, FrameDirection.DOWNSTREAM)]

    def vad_stops(self) -> list[float]:
        return [e.t for e in self.near.of(VADUserStoppedSpeakingFrame, FrameDirection.UPSTREAM)]

    def user_stops(self) -> list[float]:
        return [e.t for e in self.far.of(UserStoppedSpeakingFrame, FrameDirection.DOWNSTREAM)]

    def user_messages(self) -> list[str]:
        return [m["content"] for m in self.context.messages if m["role"] == "user"]

    def metrics(self) -> list:
        """Metrics reported during the run (the worker's initial all-zero frame left out)."""
        frames = self.far.of(MetricsFrame)[1:]
        return [d for e in frames for d in e.frame.data]


def pcm_frames(audio: np.ndarray, sample_rate: int) -> list[bytes]:
    step = sample_rate * FRAME_MS // 1000
    return [audio[i : i + step].tobytes() for i in range(0, len(audio), step)]


async def run_pipeline(
    stt,
    audio: np.ndarray,
    *,
    sample_rate: int = 16000,
    user_params=None,
    wait_ready: bool = True,
    between: dict[int, Callable[[], Awaitable[None]]] | None = None,
    timeout: float = 120.0,
) -> PipelineRun:
    """Feed int16 ``audio`` in real time through [log, stt, log, user aggregator, log].

    ``between`` maps a frame index to a coroutine run before that frame is fed (e.g. to
    restart a server mid-conversation); feeding resumes in real time afterwards.
    """
    clock = Clock()
    context = LLMContext()
    user, _assistant = LLMContextAggregatorPair(context, user_params=user_params or user_turn_params())
    head, near, far = FrameLog(clock), FrameLog(clock), FrameLog(clock)
    run = PipelineRun(head=head, near=near, far=far, context=context)

    @user.event_handler("on_user_turn_stopped")
    async def on_turn_stopped(_aggregator, _strategy, _message):
        run.turn_ends.append(clock())

    async def feed(worker):
        while wait_ready and stt.ready is None:
            await asyncio.sleep(0.01)
        paced_from = time.monotonic()
        for i, chunk in enumerate(pcm_frames(audio, sample_rate)):
            if between and i in between:
                await between[i]()
                paced_from = time.monotonic() - i * FRAME_MS / 1000
            await worker.queue_frame(InputAudioRawFrame(audio=chunk, sample_rate=sample_rate, num_channels=1))
            await asyncio.sleep(max(0.0, paced_from + (i + 1) * FRAME_MS / 1000 - time.monotonic()))
        await worker.queue_frame(EndFrame())

    params = PipelineParams(audio_in_sample_rate=sample_rate, enable_metrics=True, enable_usage_metrics=True)
    await run_worker([head, stt, near, user, far], feed, params, timeout)
    return run


def silence(seconds: float, sample_rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * sample_rate), np.int16)
