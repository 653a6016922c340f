"""Splitting streamed model output into speech, reasoning and tool calls."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from loguru import logger

from servers.llm.chat import ChatTemplate, OutputSplitter, StopMatcher, parse_tool_call
from servers.llm.random_model import CHAT_TEMPLATE


def split(pieces: list[str], **kwargs):
    splitter = OutputSplitter(**kwargs)
    outs = [splitter.push(p) for p in pieces] + [splitter.finish()]
    return "".join(o.content for o in outs), "".join(o.reasoning for o in outs), splitter


def test_plain_text_streams_through():
    assert split(["Hello ", "there."])[0] == "Hello there."


def _tools(*names: str) -> list[dict]:
    return [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}} for name in names]


def test_a_tool_call_is_held_back_and_parsed():
    content, _, splitter = split(
        ['Sure. <tool_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}</tool_call>'],
        tools=_tools("get_weather"),
    )
    assert content == "Sure. "
    [call] = splitter.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


def test_a_tag_split_across_pushes_is_never_spoken():
    content, _, splitter = split(
        ["ok <tool", "_ca", 'll>{"name": "f", "arguments": {}}</tool_', "call> done"], tools=_tools("f")
    )
    assert content == "ok  done"
    assert [c.name for c in splitter.tool_calls] == ["f"]


def test_text_that_only_looks_like_a_tag_start_is_released_in_the_end():
    assert split(["a <tool"])[0] == "a <tool"


def test_the_function_parameter_form_is_parsed():
    body = (
        "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>"
    )
    call = parse_tool_call(body)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 3}


@pytest.mark.parametrize(
    "body",
    [
        "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</function>",
        "<function=get_weather>\n<parameter=city>\nParis\n<parameter=days>\n3\n</parameter>\n",
        "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3",
    ],
    ids=["no-last-parameter-close", "no-parameter-or-function-close", "no-closes-at-the-end"],
)
def test_the_function_parameter_form_survives_missing_closing_tags(body):
    """Nemotron 3 may leave out a closing tag before the call ends (llama.cpp's parser
    allows for it): no parameter and no call is lost."""
    call = parse_tool_call(body)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 3}


@pytest.mark.parametrize(
    "text_schema",
    [
        {"type": "string"},
        {"type": ["string", "null"]},
        {"anyOf": [{"type": "string"}, {"type": "null"}]},
        {"enum": ["12345", "67890"]},
    ],
)
def test_function_parameters_are_read_as_the_tool_declares_them(text_schema):
    """A parameter whose schema allows text stays text even when it looks like a number or
    null; the others are read as JSON."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "find_order",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "order_id": text_schema,
                        "note": {"type": "string"},
                        "count": {"type": "integer"},
                    },
                },
            },
        }
    ]
    body = (
        "<function=find_order><parameter=order_id>12345</parameter><parameter=note>null</parameter>"
        "<parameter=count>2</parameter></function>"
    )
    call = parse_tool_call(body, tools)
    assert json.loads(call.arguments) == {"order_id": "12345", "note": "null", "count": 2}


def test_rendering_on_two_threads_keeps_each_ones_generation_prompt():
    """Requests render on the event loop while the engine renders on its own thread, one
    with the assistant's generation prompt and one without."""
    template = ChatTemplate(CHAT_TEMPLATE, bos_token="<s>", eos_token="<|im_end|>")
    messages = [{"role": "user", "content": "hello"}]
    expected = {flag: template.render(messages, add_generation_prompt=flag) for flag in (True, False)}
    assert expected[True] != expected[False]

    def render_many(flag: bool) -> int:
        return sum(template.render(messages, add_generation_prompt=flag) != expected[flag] for _ in range(3000))

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads interleave within each render
    try:
        with ThreadPoolExecutor(2) as pool:
            wrong = list(pool.map(render_many, [True, False]))
    finally:
        sys.setswitchinterval(switching)
    assert wrong == [0, 0]


def test_tool_call_arguments_sent_as_json_text_reach_the_template_as_a_mapping():
    """Nemotron's template iterates ``arguments|items``; OpenAI clients send the text."""
    template = ChatTemplate(
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{% for k, v in c.function.arguments|items %}{{ k }}={{ v }};{% endfor %}{% endfor %}{% endfor %}",
        bos_token="<s>",
        eos_token="</s>",
    )
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert template.render([{"role": "assistant", "content": "", "tool_calls": [call]}]) == "city=Paris;"


@pytest.mark.parametrize("body", ["not json", '{"arguments": {}}', ""])
def test_a_malformed_call_is_reported_not_spoken(body):
    warnings: list = []
    sink = logger.add(warnings.append, level="WARNING", format="{message}")
    try:
        content, _, splitter = split([f"x<tool_call>{body}</tool_call>y"], tools=_tools("f"))
    finally:
        logger.remove(sink)
    assert content == "xy" and not splitter.tool_calls and splitter.dropped_calls == [body]
    assert len(warnings) == 1 and "malformed" in warnings[0] and repr(body) in warnings[0]


@pytest.mark.parametrize("tools", [None, _tools("get_weather")], ids=["no tools", "other tools"])
def test_a_call_of_a_tool_the_request_does_not_offer_is_dropped(tools):
    body = '{"name": "delete_everything", "arguments": {}}'
    content, _, splitter = split([f"x<tool_call>{body}</tool_call>y"], tools=tools)
    assert content == "xy" and not splitter.tool_calls and splitter.dropped_calls == [body]


def test_reasoning_is_kept_out_of_the_content():
    content, reasoning, _ = split(["<think>let me see", "</think>The answer."])
    assert (content, reasoning) == ("The answer.", "let me see")


def test_a_prompt_that_opened_the_reasoning_block():
    content, reasoning, _ = split(["hmm</think>Yes."], in_reasoning=True)
    assert (content, reasoning) == ("Yes.", "hmm")


def test_the_whitespace_between_reasoning_and_answer_is_dropped():
    content, reasoning, _ = split(["hmm</think>\n", "\n", " Yes, sure."], in_reasoning=True)
    assert (content, reasoning) == ("Yes, sure.", "hmm")


@pytest.mark.parametrize("in_reasoning", [True, False], ids=["prompt opened it", "model opens it"])
def test_a_verbatim_answer_begins_where_the_reasoning_ends(in_reasoning):
    pieces = ["hmm</think>", '{"a": "<think>"}']
    content, reasoning, _ = split(
        pieces if in_reasoning else ["<think>", *pieces], in_reasoning=in_reasoning, verbatim=True, reasoning=True
    )
    assert (content, reasoning) == ('{"a": "<think>"}', "hmm")


def _stopped(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], StopMatcher]:
    matcher = StopMatcher(stops)
    return [matcher.push(piece) for piece in pieces], matcher


def test_output_ends_before_a_stop_sequence_split_across_pushes():
    passed, matcher = _stopped(("User:",), ["Fine. Us", "er", ": hi"])
    assert passed == ["Fine. ", "", ""] and matcher.stopped


def test_text_that_only_began_like_a_stop_sequence_is_passed_on():
    passed, matcher = _stopped(("User:",), ["Fine. Us", "ually"])
    assert passed == ["Fine. ", "Usually"] and not matcher.stopped


def test_the_earliest_of_several_stop_sequences_ends_the_output():
    passed, _ = _stopped(("cd", "b"), ["abcd"])
    assert passed == ["a"]


def test_held_text_is_released_when_the_output_ends():
    passed, matcher = _stopped(("User:",), ["Fine. Use"])
    assert (passed, matcher.flush()) == (["Fine. "], "Use")
