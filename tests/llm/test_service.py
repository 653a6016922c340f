"""NemotronLLMService in a real Pipecat pipeline against the LLM server on loopback."""

from pipecat.frames.frames import EndFrame, LLMContextFrame, LLMFullResponseEndFrame, LLMTextFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext

from pipecat_nvidia.llm import NemotronLLMService
from servers.llm.engine import ChatRequest
from tests.llm.helpers import SYSTEM, make_engine, run
from tests.pipeline import Clock, FrameLog, run_worker

QUESTION = [SYSTEM, {"role": "user", "content": "hello world"}]


async def test_the_service_streams_what_the_model_generates(start_llm_server, tiny_llm_path):
    server = await start_llm_server()
    service = NemotronLLMService(
        base_url=f"http://127.0.0.1:{server.port}/v1",
        settings=NemotronLLMService.Settings(
            model="nemotron", system_instruction=SYSTEM["content"], temperature=0.0, max_tokens=24
        ),
    )
    log = FrameLog(Clock())

    async def feed(worker):
        await worker.queue_frames([LLMContextFrame(LLMContext(messages=QUESTION[1:])), EndFrame()])

    await run_worker([service, log], feed, PipelineParams(enable_metrics=True))
    text = "".join(e.frame.text for e in log.of(LLMTextFrame))
    assert log.of(LLMFullResponseEndFrame)
    assert text == run(make_engine(tiny_llm_path), ChatRequest(QUESTION, max_tokens=24))[0]


def test_settings_that_name_no_model_keep_the_nemotron_default():
    service = NemotronLLMService(settings=NemotronLLMService.Settings(temperature=0.3))
    assert (service._settings.model, service._settings.temperature) == ("nemotron-3-nano", 0.3)
