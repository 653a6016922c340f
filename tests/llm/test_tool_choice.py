"""Forced tool calls (``tool_choice`` ``"required"`` or a named function) through the
OpenAI-compatible endpoint: whatever a random model's weights say, the answer is calls
of the request's tools, with arguments of the types their schemas declare, written in the
form the model's chat template uses; with reasoning on, after the reasoning."""

import json

import openai
import pytest

from servers.llm.random_model import CHAT_TEMPLATE, write_random_llama_gguf
from servers.llm.tool_grammar import tool_call_form
from tests.llm.scripted_model import NEWLINE, SURE, write_bigram_llama_gguf, write_scripted_llama_gguf
from tests.llm.test_server import QUESTION, client

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer"},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "days"],
        },
    },
}
HANG_UP = {"type": "function", "function": {"name": "hang_up", "parameters": {"type": "object", "properties": {}}}}
XML_TEMPLATE = CHAT_TEMPLATE.replace(
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call>',
    "<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>",
)


async def _calls(server, tool_choice, **sampling) -> tuple[list, str, str | None]:
    response = await client(server).chat.completions.create(
        model="m",
        messages=QUESTION,
        tools=[WEATHER, HANG_UP],
        tool_choice=tool_choice,
        max_tokens=200,
        **({"temperature": 0} | sampling),
    )
    choice = response.choices[0]
    return choice.message.tool_calls or [], choice.finish_reason, choice.message.content


def _check_weather_arguments(arguments: str) -> None:
    parsed = json.loads(arguments)
    assert set(parsed) <= {"city", "days", "unit"} and {"city", "days"} <= set(parsed)
    assert isinstance(parsed["city"], str) and type(parsed["days"]) is int
    assert parsed.get("unit", "c") in ("c", "f")


def test_the_form_follows_the_chat_template():
    assert (tool_call_form(CHAT_TEMPLATE), tool_call_form(XML_TEMPLATE)) == ("json", "xml")


@pytest.fixture(params=["json", "xml"])
async def server(request, start_llm_server, tmp_path):
    template = XML_TEMPLATE if request.param == "xml" else CHAT_TEMPLATE
    model = write_random_llama_gguf(tmp_path / f"{request.param}.gguf", chat_template=template)
    return await start_llm_server(model=str(model))


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 5}], ids=["greedy", "sampled"])
async def test_required_makes_a_random_model_call_the_tools(server, sampling):
    calls, finish_reason, content = await _calls(server, "required", **sampling)
    assert finish_reason == "tool_calls" and not content
    assert calls and {c.function.name for c in calls} <= {"get_weather", "hang_up"}
    for call in calls:
        if call.function.name == "get_weather":
            _check_weather_arguments(call.function.arguments)
        else:
            assert json.loads(call.function.arguments) == {}


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 5}], ids=["greedy", "sampled"])
async def test_a_named_function_is_called_once(server, sampling):
    named = {"type": "function", "function": {"name": "get_weather"}}
    [call], finish_reason, content = await _calls(server, named, **sampling)
    assert (call.function.name, finish_reason, content) == ("get_weather", "tool_calls", None)
    _check_weather_arguments(call.function.arguments)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tool_choice": "required"}, "no tools"),
        ({"tools": [HANG_UP], "tool_choice": {"type": "function", "function": {"name": "dial"}}}, "'dial'"),
        ({"tools": [HANG_UP], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "https://x.test/s"}}}],
                "tool_choice": "required",
            },
            "cannot be turned into a grammar",
        ),
    ],
)
async def test_a_tool_choice_that_cannot_be_had_is_refused(start_llm_server, fields, message):
    server = await start_llm_server()
    with pytest.raises(openai.BadRequestError, match=message):
        await client(server).chat.completions.create(model="m", messages=QUESTION, max_tokens=3, **fields)


async def test_with_reasoning_on_the_call_is_forced_after_the_reasoning(start_llm_server, tmp_path):
    """A template that opens the reasoning in the prompt (as Nemotron 3's does), and a
    model that reasons, then would answer in words."""
    opens_reasoning = CHAT_TEMPLATE.replace(
        "{% if enable_thinking is defined and enable_thinking is false %}",
        "{% if enable_thinking %}<think>\n{% elif enable_thinking is defined and enable_thinking is false %}",
    )
    assert opens_reasoning != CHAT_TEMPLATE
    model = write_bigram_llama_gguf(
        tmp_path / "reasons.gguf",
        [(NEWLINE, "hmm", SURE), ("hmm", "</think>", SURE), ("</think>", "Sure", SURE)],
        chat_template=opens_reasoning,
    )
    server = await start_llm_server(model=str(model))
    response = await client(server).chat.completions.create(
        model="m",
        messages=QUESTION,
        tools=[WEATHER, HANG_UP],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    message = response.choices[0].message
    assert (message.reasoning_content, message.content, response.choices[0].finish_reason) == (
        "hmm",
        None,
        "tool_calls",
    )
    [call] = message.tool_calls
    assert call.function.name == "get_weather"
    _check_weather_arguments(call.function.arguments)


async def test_without_parallel_tool_calls_the_answer_ends_with_its_first_call(start_llm_server, tmp_path):
    script = [
        '<tool_call>{"name": "hang_up", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}</tool_call>',
    ]
    server = await start_llm_server(model=str(write_scripted_llama_gguf(tmp_path / "two.gguf", script)))
    calls = {}
    for parallel in (True, False):
        response = await client(server).chat.completions.create(
            model="m", messages=QUESTION, tools=[WEATHER, HANG_UP], parallel_tool_calls=parallel, max_tokens=50
        )
        assert response.choices[0].finish_reason == "tool_calls"
        calls[parallel] = [c.function.name for c in response.choices[0].message.tool_calls]
    assert calls == {True: ["hang_up", "get_weather"], False: ["hang_up"]}
