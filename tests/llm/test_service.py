"""NemotronLLMService in a real Pipecat pipeline against the LLM server on loopback."""

from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.adapters.llm.schemas.tools_schema import ToolsSchema
from pipecat.frames.frames import (
    EndFrame,
    FunctionCallResultProperties,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMTextFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.llm_service import FunctionCallParams

from pipecat_nvidia.llm import NemotronLLMService
from servers.llm.engine import ChatRequest
from tests.llm.helpers import SYSTEM, make_engine, run
from tests.llm.scripted_model import write_scripted_llama_gguf
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


async def test_every_tool_call_of_a_reply_runs(start_llm_server, tmp_path):
    """A model that calls two tools in one reply gets both run: Pipecat reads one call per
    streamed chunk. The XML form's string parameter stays a string."""
    script = [
        "One moment. ",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
        "<tool_call><function=find_order><parameter=order_id>12345</parameter></function></tool_call>",
    ]
    server = await start_llm_server(model=str(write_scripted_llama_gguf(tmp_path / "tools.gguf", script)))
    service = NemotronLLMService(base_url=f"http://127.0.0.1:{server.port}/v1")
    calls = []

    async def handler(params: FunctionCallParams):
        calls.append((params.function_name, dict(params.arguments)))
        await params.result_callback("done", properties=FunctionCallResultProperties(run_llm=False))

    tools = [
        FunctionSchema(name="get_weather", description="", properties={"city": {"type": "string"}}, required=[]),
        FunctionSchema(name="find_order", description="", properties={"order_id": {"type": "string"}}, required=[]),
    ]
    for tool in tools:
        service.register_function(tool.name, handler)
    context = LLMContext(messages=QUESTION[1:], tools=ToolsSchema(standard_tools=tools))

    async def feed(worker):
        await worker.queue_frames([LLMContextFrame(context), EndFrame()])

    await run_worker([service, FrameLog(Clock())], feed, PipelineParams())
    assert sorted(calls) == [("find_order", {"order_id": "12345"}), ("get_weather", {"city": "Paris"})]


def test_settings_that_name_no_model_keep_the_nemotron_default():
    service = NemotronLLMService(settings=NemotronLLMService.Settings(temperature=0.3))
    assert (service._settings.model, service._settings.temperature) == ("nemotron-3-nano", 0.3)
