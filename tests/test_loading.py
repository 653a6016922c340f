"""Background model loads: one at a time, and abandoned (never waited for) when their server stops."""

import asyncio
import threading
import time

from servers.common.loading import EXCLUSIVE_GPU_WORK, BackgroundLoad, load_under_way


def _no_driver(engine, on_step):
    return lambda: None


class SlowLoad:
    """A load that runs until released, recording that it started."""

    def __init__(self, name: str):
        self.name = name
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> str:
        self.started.set()
        self.release.wait(30)
        return self.name

    def background(self) -> BackgroundLoad:
        return BackgroundLoad(self.name, self.name, self, on_step=lambda stats: None, driver=_no_driver)


def _wait_for_load_threads_to_end() -> None:
    for _ in range(500):
        if not any(thread.name.endswith("-load") for thread in threading.enumerate()):
            return
        time.sleep(0.01)
    raise AssertionError(f"a load still under way: {load_under_way()}")


async def _until(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.01)


async def _start_while_first_loads(first: SlowLoad, second: SlowLoad) -> tuple[BackgroundLoad, BackgroundLoad]:
    loads = first.background(), second.background()
    for load in loads:
        load.start()
    await _until(first.started)
    return loads


def test_a_load_waiting_for_another_reports_queued_then_loads():
    first, second = SlowLoad("A"), SlowLoad("B")

    async def main():
        loads = await _start_while_first_loads(first, second)
        queued = [load.health()[1]["queued"] for load in loads]
        first.release.set()
        second.release.set()
        await asyncio.gather(*(load.wait() for load in loads))
        return queued, [load.status for load in loads]

    assert asyncio.run(main()) == ([False, True], ["ready", "ready"])


def test_a_stopped_server_never_starts_its_queued_load():
    first, second = SlowLoad("A"), SlowLoad("B")

    async def main():
        loads = await _start_while_first_loads(first, second)
        await loads[1].stop()

    asyncio.run(main())
    first.release.set()
    _wait_for_load_threads_to_end()
    assert not second.started.is_set()


def test_stopping_does_not_wait_for_the_load_under_way():
    load = SlowLoad("A")

    async def main():
        background = load.background()
        background.start()
        await _until(load.started)
        await background.stop()

    asyncio.run(main())  # would take the load's 30 s if the loop's shutdown waited for it
    try:
        assert load_under_way() == "A"
    finally:
        load.release.set()
        _wait_for_load_threads_to_end()


def test_loads_run_in_the_order_they_were_started():
    """The host starts the LLM's last: its quantisation is chosen by the memory the others leave."""
    order: list[str] = []

    def load_of(name: str):
        def load() -> str:
            order.append(name)
            return name

        return BackgroundLoad(name, name, load, on_step=lambda stats: None, driver=_no_driver)

    async def main():
        loads = [load_of(name) for name in "ABCDEFGH"]
        for load in loads:
            load.start()
        await asyncio.gather(*(load.wait() for load in loads))

    asyncio.run(main())
    assert order == list("ABCDEFGH")


def _warm_up_holds_the_gpu(monkeypatch, engine_class) -> list[bool]:
    """Whether ``EXCLUSIVE_GPU_WORK`` was held during each of ``engine_class``'s warm-ups."""
    held = []
    warm_up = engine_class.warm_up

    def observed(engine):
        held.append(EXCLUSIVE_GPU_WORK.locked())
        warm_up(engine)

    monkeypatch.setattr(engine_class, "warm_up", observed)
    return held


def test_the_asr_server_warms_up_alone_on_the_gpu(monkeypatch, tiny_asr_path):
    """A warm-up captures CUDA graphs: another engine's replay then would fail."""
    from servers.asr.config import AsrServerSettings
    from servers.asr.engine import StreamingASREngine
    from servers.asr.server import load_engine

    held = _warm_up_holds_the_gpu(monkeypatch, StreamingASREngine)
    load_engine(AsrServerSettings(model=str(tiny_asr_path), device="cpu"))
    assert held == [True]
    assert not EXCLUSIVE_GPU_WORK.locked()


def test_the_tts_server_warms_up_alone_on_the_gpu(monkeypatch, tiny_tts_path):
    from servers.tts.config import TtsServerSettings
    from servers.tts.engine import TTSEngine
    from servers.tts.server import load_engine

    held = _warm_up_holds_the_gpu(monkeypatch, TTSEngine)
    load_engine(TtsServerSettings(model=str(tiny_tts_path), device="cpu"))
    assert held == [True]
    assert not EXCLUSIVE_GPU_WORK.locked()
