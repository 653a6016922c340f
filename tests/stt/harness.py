"""Run a real Pipecat pipeline on real speech, paced in real time, and log its frames."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InputAudioRawFrame,
    MetricsFrame,
    TranscriptionFrame,
    UserSpeakingFrame,
    UserStoppedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from pipecat_nvidia.turns import user_turn_params

FRAME_MS = 20


@dataclass
class Logged:
    t: float
    direction: FrameDirection
    frame: Frame


class FrameLog(FrameProcessor):
    """Passes every frame on; remembers all but audio and speaking ticks, with a time."""

    def __init__(self, clock: Callable[[], float], **kwargs):
        super().__init__(**kwargs)
        self._clock = clock
        self.events: list[Logged] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if not isinstance(frame, (InputAudioRawFrame, UserSpeakingFrame)):
            self.events.append(Logged(self._clock(), direction, frame))
        await self.push_frame(frame, direction)

    def of(self, kind: type, direction: FrameDirection | None = None) -> list[Logged]:
        return [e for e in self.events if isinstance(e.frame, kind) and direction in (None, e.direction)]


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
    start = time.monotonic()

    def clock() -> float:
        return time.monotonic() - start

    context = LLMContext()
    user, _assistant = LLMContextAggregatorPair(context, user_params=user_params or user_turn_params())
    head, near, far = FrameLog(clock), FrameLog(clock), FrameLog(clock)
    run = PipelineRun(head=head, near=near, far=far, context=context)

    @user.event_handler("on_user_turn_stopped")
    async def on_turn_stopped(_aggregator, _strategy, _message):
        run.turn_ends.append(clock())

    worker = PipelineWorker(
        Pipeline([head, stt, near, user, far]),
        params=PipelineParams(audio_in_sample_rate=sample_rate, enable_metrics=True, enable_usage_metrics=True),
        cancel_on_idle_timeout=False,
        enable_rtvi=False,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(_worker, _frame):
        started.set()

    async def feed():
        await started.wait()
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

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(asyncio.gather(runner.run(), feed()), timeout)
    return run


def silence(seconds: float, sample_rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * sample_rate), np.int16)
