"""Running a real Pipecat pipeline in a test and logging the frames that pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pipecat.frames.frames import Frame, InputAudioRawFrame, UserSpeakingFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner


class Clock:
    def __init__(self) -> None:
        self._start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self._start


@dataclass
class Logged:
    t: float
    direction: FrameDirection
    frame: Frame


class FrameLog(FrameProcessor):
    """Passes every frame on; remembers all but input audio and speaking ticks, with a time."""

    def __init__(self, clock: Clock, **kwargs):
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


async def run_worker(
    processors: list[FrameProcessor],
    feed: Callable[[PipelineWorker], Awaitable[None]],
    params: PipelineParams,
    timeout: float = 120.0,
) -> None:
    """Run the pipeline until ``feed`` (called once it has started) has queued its
    frames and an ``EndFrame`` has gone through."""
    worker = PipelineWorker(Pipeline(processors), params=params, cancel_on_idle_timeout=False, enable_rtvi=False)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(_worker, _frame):
        started.set()

    async def fed():
        await started.wait()
        await feed(worker)

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)

    async def run_until_fed():
        running = asyncio.create_task(runner.run())
        try:
            await fed()
        except BaseException:
            # A failed check in ``feed`` (or the timeout) must not leave the pipeline running.
            await runner.cancel()
            await running
            raise
        await running

    await asyncio.wait_for(run_until_fed(), timeout)
