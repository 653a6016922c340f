"""Splitting streamed model output into speech, reasoning and tool calls."""

import json

import pytest

from servers.llm.chat import OutputSplitter, parse_tool_call


def split(pieces: list[str], **kwargs):
    splitter = OutputSplitter(**kwargs)
    outs = [splitter.push(p) for p in pieces] + [splitter.finish()]
    return "".join(o.content for o in outs), "".join(o.reasoning for o in outs), splitter


def test_plain_text_streams_through():
    assert split(["Hello ", "there."])[0] == "Hello there."


def test_a_tool_call_is_held_back_and_parsed():
    content, _, splitter = split(
        ['Sure. <tool_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}</tool_call>']
    )
    assert content == "Sure. "
    [call] = splitter.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


def test_a_tag_split_across_pushes_is_never_spoken():
    content, _, splitter = split(["ok <tool", "_ca", 'll>{"name": "f", "arguments": {}}</tool_', "call> done"])
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


@pytest.mark.parametrize("body", ["not json", '{"arguments": {}}', ""])
def test_a_malformed_call_is_reported_not_spoken(body):
    content, _, splitter = split([f"x<tool_call>{body}</tool_call>y"])
    assert content == "xy" and not splitter.tool_calls


def test_reasoning_is_kept_out_of_the_content():
    content, reasoning, _ = split(["<think>let me see", "</think>The answer."])
    assert (content, reasoning) == ("The answer.", "let me see")


def test_a_prompt_that_opened_the_reasoning_block():
    content, reasoning, _ = split(["hmm</think>Yes."], in_reasoning=True)
    assert (content, reasoning) == ("Yes.", "hmm")
