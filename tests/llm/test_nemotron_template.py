"""The engine under a chat template shaped as Nemotron 3's is (written here, not copied):
it closes the reasoning in the generation prompt itself (``<think></think>``, no newline),
writes ``<think></think>`` before every reply in the history, and reads each tool call's
arguments as a mapping (``arguments|items``) in the XML call form."""

from __future__ import annotations

import json

import pytest

from servers.llm.engine import ChatRequest, LlmDelta
from servers.llm.random_model import write_random_llama_gguf
from tests.llm.helpers import SYSTEM, make_engine, run

NEMOTRON_LIKE = r"""
{%- set thinking = enable_thinking if enable_thinking is defined else true -%}
{%- for m in messages -%}
{%- if m.role == 'assistant' -%}
{%- set content = m.content or '' -%}
{%- if '</think>' not in content %}{% set content = '<think></think>' ~ content %}{% endif -%}
<|im_start|>assistant
{{ content | trim }}
{%- for call in m.tool_calls or [] %}
<tool_call>
<function={{ call.function.name }}>
{% for name, value in call.function.arguments | items %}<parameter={{ name }}>
{{ value }}
</parameter>
{% endfor %}</function>
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' -%}
<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if thinking %}<think>
{% else %}<think></think>{% endif -%}
{%- endif -%}
"""
QUESTION = [SYSTEM, {"role": "user", "content": "hello world, what is the weather?"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_llama_gguf(tmp_path_factory.mktemp("nemotron_like") / "m.gguf", chat_template=NEMOTRON_LIKE)


def test_with_reasoning_off_the_answer_is_content(model):
    engine = make_engine(model)
    assert engine.template.render(QUESTION).endswith("<|im_start|>assistant\n<think></think>")
    events = []
    engine.submit(ChatRequest(QUESTION, max_tokens=12), events.append)
    engine.run_until_idle()
    deltas = [e for e in events if isinstance(e, LlmDelta)]
    assert "".join(d.content for d in deltas) and not "".join(d.reasoning for d in deltas)


def test_each_turn_evaluates_only_its_new_messages(model):
    """The history's ``<think></think>`` before a reply is what the generation prompt held
    when the reply was made: the whole previous turn stays in the cache."""
    engine = make_engine(model)
    messages = QUESTION
    held = 0
    for follow_up in ("and the city?", "thanks"):
        reply, finished = run(engine, ChatRequest(messages, max_tokens=10))
        assert finished.usage.cached_tokens == held
        held = finished.usage.prompt_tokens + finished.usage.completion_tokens
        messages = [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]


def test_tool_call_history_renders_its_json_arguments_as_parameters(model):
    engine = make_engine(model)
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})},
    }
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    assert "<function=get_weather>\n<parameter=city>\nOslo\n</parameter>" in engine.template.render(history)
    _, finished = run(engine, ChatRequest(history, max_tokens=4))
    assert finished.usage.completion_tokens == 4
