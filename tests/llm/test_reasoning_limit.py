"""A limit on the reasoning (NIM's ``nvext.max_thinking_tokens``, the server's
``--max-thinking-tokens``): scripted models that would reason until ``max_tokens`` runs
out have their reasoning closed, then answer."""

import json

import openai
import pytest
from pipecat.frames.frames import EndFrame, LLMContextFrame, LLMTextFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext

from pipecat_nvidia.llm import NemotronLLMService, reasoning_extra
from servers.llm.engine import ChatRequest, LlmDelta
from tests.llm.helpers import make_engine
from tests.llm.scripted_model import NEWLINE, SURE, write_bigram_llama_gguf
from tests.llm.test_server import QUESTION, client
from tests.pipeline import Clock, FrameLog, run_worker

ANSWER = [("</think>", "Yes", SURE), ("Yes", "!", SURE)]


@pytest.fixture(scope="module")
def ruminating_model(tmp_path_factory):
    """Reasons "hmm" for ever; after ``</think>`` it answers "Yes!"."""
    edges = [(NEWLINE, "<think>", SURE), ("<think>", "hmm", SURE), ("hmm", "hmm", SURE), *ANSWER]
    return write_bigram_llama_gguf(tmp_path_factory.mktemp("llm") / "ruminates.gguf", edges)


@pytest.fixture(scope="module")
def line_model(tmp_path_factory):
    """Reasons in lines of three tokens ("abc.", one line after another) for ever."""
    edges = [(NEWLINE, "<think>", SURE), ("<think>", "a", SURE), ("a", "b", SURE), ("b", "c.\n", SURE)]
    edges += [("c.\n", "a", SURE), *ANSWER]
    return write_bigram_llama_gguf(tmp_path_factory.mktemp("llm") / "lines.gguf", edges)


def _run(model, limit: int | None, **settings) -> tuple[str, str, str]:
    """Reasoning, content and finish reason of one request with reasoning on."""
    events: list = []
    engine = make_engine(model, **settings)
    request = ChatRequest(messages=QUESTION, max_tokens=80, enable_thinking=True, max_thinking_tokens=limit)
    engine.submit(request, events.append)
    engine.run_until_idle()
    deltas = [e for e in events if isinstance(e, LlmDelta)]
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas), events[-1].finish_reason


def test_without_a_limit_the_reasoning_runs_until_max_tokens(ruminating_model):
    """The precondition of the other tests: the model never closes its reasoning itself."""
    reasoning, content, finish = _run(ruminating_model, None)
    assert (reasoning, content, finish) == ("hmm" * 79, "", "length")


def test_a_reasoning_over_its_limit_is_closed_and_the_answer_follows(ruminating_model):
    """No line ends within a tenth more (none for a limit under 10): cut at the limit."""
    reasoning, content, finish = _run(ruminating_model, 5)
    assert (reasoning, content, finish) == ("hmm" * 5 + "\n", "Yes!", "stop")


def test_the_limit_waits_for_the_end_of_a_line_within_a_tenth_more(line_model):
    """20 tokens end mid-line; the line ends at the 21st, within 2 more: closed there."""
    reasoning, content, _ = _run(line_model, 20)
    assert (reasoning, content) == ("abc.\n" * 7, "Yes!")


def test_a_line_not_ended_within_a_tenth_more_is_cut(line_model):
    """10 tokens end mid-line and the 11th does not end it: cut after the 11th."""
    reasoning, content, _ = _run(line_model, 10)
    assert (reasoning, content) == ("abc.\n" * 3 + "ab\n", "Yes!")


def test_a_limit_of_zero_closes_the_reasoning_at_once(ruminating_model):
    reasoning, content, _ = _run(ruminating_model, 0)
    assert (reasoning, content) == ("", "Yes!")


def test_the_engine_default_applies_to_a_request_without_a_limit(ruminating_model):
    reasoning, _, _ = _run(ruminating_model, None, default_max_thinking_tokens=3)
    assert reasoning == "hmm" * 3 + "\n"


async def test_a_request_sets_the_limit_with_nims_nvext_field(start_llm_server, ruminating_model):
    server = await start_llm_server(model=str(ruminating_model))
    response = await client(server).chat.completions.create(
        model="m",
        messages=QUESTION,
        max_tokens=80,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "nvext": {"max_thinking_tokens": 4}},
    )
    message = response.choices[0].message
    assert (message.reasoning_content, message.content) == ("hmm" * 4 + "\n", "Yes!")


async def test_the_servers_flag_limits_requests_that_set_none(start_llm_server, ruminating_model):
    server = await start_llm_server(model=str(ruminating_model), max_thinking_tokens=2)
    response = await client(server).chat.completions.create(
        model="m", messages=QUESTION, max_tokens=80, extra_body={"chat_template_kwargs": {"enable_thinking": True}}
    )
    assert response.choices[0].message.reasoning_content == "hmm" * 2 + "\n"


async def test_the_answer_after_a_closed_reasoning_is_held_to_the_schema(start_llm_server, ruminating_model):
    """The grammar waits for ``</think>``: a close the server says must start it too."""
    server = await start_llm_server(model=str(ruminating_model))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    response = await client(server).chat.completions.create(
        model="m",
        messages=QUESTION,
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}},
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "nvext": {"max_thinking_tokens": 3}},
    )
    assert isinstance(json.loads(response.choices[0].message.content)["ok"], bool)


async def test_a_negative_limit_is_refused(start_llm_server, ruminating_model):
    server = await start_llm_server(model=str(ruminating_model))
    with pytest.raises(openai.BadRequestError, match="max_thinking_tokens"):
        await client(server).chat.completions.create(
            model="m", messages=QUESTION, extra_body={"nvext": {"max_thinking_tokens": -1}}
        )


async def _spoken(server, settings: NemotronLLMService.Settings) -> str:
    """The text a ``NemotronLLMService`` with ``settings`` gets from ``server`` for the question."""
    service = NemotronLLMService(base_url=f"http://127.0.0.1:{server.port}/v1", settings=settings)
    log = FrameLog(Clock())

    async def feed(worker):
        await worker.queue_frames([LLMContextFrame(LLMContext(messages=QUESTION[1:])), EndFrame()])

    await run_worker([service, log], feed, PipelineParams())
    return "".join(e.frame.text for e in log.of(LLMTextFrame))


async def test_the_service_asks_for_limited_reasoning_and_speaks_only_the_answer(start_llm_server, ruminating_model):
    server = await start_llm_server(model=str(ruminating_model))
    assert await _spoken(server, NemotronLLMService.Settings(max_tokens=80, extra=reasoning_extra(3))) == "Yes!"


async def test_the_reasoning_limit_comes_on_top_of_the_answers_max_tokens(start_llm_server, ruminating_model):
    """Servers count reasoning against ``max_tokens``: a reasoning limit above the answer's
    would leave the bot nothing to say, and no error."""
    server = await start_llm_server(model=str(ruminating_model))
    assert await _spoken(server, NemotronLLMService.Settings(max_tokens=5, extra=reasoning_extra(30))) == "Yes!"
