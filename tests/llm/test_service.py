"""NemotronLLMService in a real Pipecat pipeline against the LLM server on loopback."""

import asyncio

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
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.services.llm_service import FunctionCallParams

from pipecat_nvidia.llm import NemotronLLMService, reasoning_extra
from servers.llm.engine import ChatRequest
from tests.llm.helpers import SYSTEM, make_engine, run
from tests.llm.scripted_model import write_scripted_llama_gguf
from tests.pipeline import Clock, FrameLog, run_worker

QUESTION = [SYSTEM, {"role": "user", "content": "hello world"}]
GET_WEATHER = FunctionSchema(name="get_weather", description="", properties={"city": {"type": "string"}}, required=[])


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
        GET_WEATHER,
        FunctionSchema(name="find_order", description="", properties={"order_id": {"type": "string"}}, required=[]),
    ]
    for tool in tools:
        service.register_function(tool.name, handler)
    context = LLMContext(messages=QUESTION[1:], tools=ToolsSchema(standard_tools=tools))

    async def feed(worker):
        await worker.queue_frames([LLMContextFrame(context), EndFrame()])

    await run_worker([service, FrameLog(Clock())], feed, PipelineParams())
    assert sorted(calls) == [("find_order", {"order_id": "12345"}), ("get_weather", {"city": "Paris"})]


async def test_the_request_after_a_tool_result_keeps_the_conversation_within_its_budget(start_llm_server, tmp_path):
    """That request comes from the assistant aggregator, after the LLM, with the tool's
    result added: a long result takes the conversation past ``history_tokens``."""
    script = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>']
    model = write_scripted_llama_gguf(tmp_path / "tools.gguf", script)
    server = await start_llm_server(model=str(model), context_size=4096)
    service = NemotronLLMService(base_url=f"http://127.0.0.1:{server.port}/v1", history_tokens=600)
    results = 0
    rerun = asyncio.Event()

    async def handler(params: FunctionCallParams):
        nonlocal results
        results += 1
        properties = FunctionCallResultProperties(run_llm=results == 1)
        await params.result_callback("sunny " * 300 if results == 1 else "done", properties=properties)
        if results == 2:
            rerun.set()

    service.register_function(GET_WEATHER.name, handler)
    earlier = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 30} for i in range(10)]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    context = LLMContext(messages=[*earlier, question], tools=ToolsSchema(standard_tools=[GET_WEATHER]))
    _, assistant = LLMContextAggregatorPair(context)

    async def feed(worker):
        await worker.queue_frame(LLMContextFrame(context))
        try:
            await asyncio.wait_for(rerun.wait(), 60)
        finally:
            await worker.queue_frame(EndFrame())

    await run_worker([service, assistant, FrameLog(Clock())], feed, PipelineParams())
    assert context.messages[0] == question, "the earlier turns were dropped before the second request"
    assert [m["role"] for m in context.messages[1:3]] == ["assistant", "tool"]


def test_settings_that_name_no_model_keep_the_nemotron_default():
    service = NemotronLLMService(settings=NemotronLLMService.Settings(temperature=0.3))
    assert (service._settings.model, service._settings.temperature) == ("nemotron-3-nano", 0.3)


def _request_body(service: NemotronLLMService) -> dict:
    return service.build_chat_completion_params({"messages": [{"role": "user", "content": "hi"}]})["extra_body"]


def test_each_request_says_reasoning_is_off():
    """Nemotron 3's chat template reasons unless told not to; vLLM and NIM follow it."""
    assert _request_body(NemotronLLMService())["chat_template_kwargs"] == {"enable_thinking": False}


def test_reasoning_asked_for_in_the_settings_is_on():
    service = NemotronLLMService(settings=NemotronLLMService.Settings(extra=reasoning_extra(64)))
    body = _request_body(service)
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["nvext"] == {"max_thinking_tokens": 64}


def test_other_chat_template_arguments_in_the_settings_leave_reasoning_off():
    extra = {"extra_body": {"chat_template_kwargs": {"truncate_history_thinking": False}}}
    body = _request_body(NemotronLLMService(settings=NemotronLLMService.Settings(extra=extra)))
    assert body["chat_template_kwargs"] == {"enable_thinking": False, "truncate_history_thinking": False}


def test_top_k_in_the_settings_reaches_the_request():
    """Pipecat's OpenAI service leaves it out; the host, vLLM and llama.cpp's server take it."""
    assert _request_body(NemotronLLMService(settings=NemotronLLMService.Settings(top_k=20)))["top_k"] == 20
    assert "top_k" not in _request_body(NemotronLLMService())
