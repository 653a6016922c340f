"""Structured output (``response_format``) through the OpenAI-compatible endpoint: a
random model's answer is held to the schema by llama.cpp's grammar sampler, a scripted
model's answer is cut where the JSON ends."""

import json

import pytest
from openai import AsyncOpenAI, BadRequestError, InternalServerError

from servers.llm.random_model import write_random_llama_gguf
from servers.llm.structured import Grammar, GrammarRejected
from tests.llm.helpers import make_engine
from tests.llm.scripted_model import write_scripted_llama_gguf
from tests.llm.test_server import QUESTION, client

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "rain": {"type": "boolean"},
        "days": {"type": "integer"},
    },
    "required": ["city", "rain", "days"],
    "additionalProperties": False,
}


async def _answer(llm: AsyncOpenAI, response_format: dict, **kwargs) -> tuple[str, str]:
    """The streamed content and finish reason of one request."""
    chunks = [
        c
        async for c in await llm.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=200, stream=True, response_format=response_format, **kwargs
        )
    ]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return content, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}])
async def test_a_random_model_answers_in_the_schema_asked_for(start_llm_server, sampling):
    server = await start_llm_server()
    response_format = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    content, finish_reason = await _answer(client(server), response_format, **sampling)
    answer = json.loads(content)
    assert finish_reason == "stop"
    assert answer.keys() == {"city", "rain", "days"}
    assert answer["city"] in ("Paris", "Oslo")
    assert isinstance(answer["rain"], bool)
    assert isinstance(answer["days"], int)


async def test_a_json_object_answer_ends_where_the_object_does(start_llm_server, tmp_path):
    model = write_scripted_llama_gguf(tmp_path / "chatty.gguf", ['{"a":', " 1", "}", " and", " more"])
    server = await start_llm_server(model=str(model))
    content, finish_reason = await _answer(client(server), {"type": "json_object"}, temperature=0)
    assert (json.loads(content), finish_reason) == ({"a": 1}, "stop")


async def test_with_reasoning_on_the_answer_after_the_reasoning_is_held_to_the_schema(start_llm_server, tmp_path):
    """The reasoning is free (the grammar waits for its end), the answer is JSON."""
    model = write_scripted_llama_gguf(tmp_path / "reasons.gguf", ["<think>", "hmm", "</think>", "not", " json"])
    server = await start_llm_server(model=str(model))
    response = await client(server).chat.completions.create(
        model="m",
        messages=QUESTION,
        max_tokens=200,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}},
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    message = response.choices[0].message
    assert message.reasoning_content == "hmm"
    assert json.loads(message.content).keys() == {"city", "rain", "days"}


async def test_json_strings_hold_no_raw_control_characters(start_llm_server, tmp_path):
    """The model would put a raw tab inside the string; JSON (and ``json.loads``) refuse one."""
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", "maxLength": 4}},
        "required": ["s"],
        "additionalProperties": False,
    }
    model = write_scripted_llama_gguf(tmp_path / "tab.gguf", ['{"s":', ' "a\tb', '"}'])
    server = await start_llm_server(model=str(model))
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    content, finish_reason = await _answer(client(server), response_format, temperature=0)
    assert finish_reason == "stop"
    assert "\t" not in json.loads(content)["s"]


async def test_tags_inside_a_json_answer_are_its_text(start_llm_server, tmp_path):
    model = write_scripted_llama_gguf(tmp_path / "tags.gguf", ['{"a":', ' "', "<think>", "x", "</think>", '"}'])
    server = await start_llm_server(model=str(model))
    content, _ = await _answer(client(server), {"type": "json_object"}, temperature=0)
    assert json.loads(content) == {"a": "<think>x</think>"}


async def test_with_reasoning_on_a_model_whose_think_close_is_no_token_cannot_hold_an_answer(
    start_llm_server, tmp_path
):
    """The grammar waits for the ``</think>`` token; without one, it would never start."""
    model = write_random_llama_gguf(tmp_path / "no-tags.gguf", think_tags=False)
    server = await start_llm_server(model=str(model))
    llm = client(server, max_retries=0)
    with pytest.raises(BadRequestError, match="</think> must be one token"):
        await llm.chat.completions.create(
            model="m",
            messages=QUESTION,
            response_format={"type": "json_object"},
            extra_body={"chat_template_kwargs": {"enable_thinking": True}},
        )
    content, _ = await _answer(llm, {"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(content), dict)


def test_a_grammar_llama_cpp_cannot_parse_is_refused(tiny_llm_path):
    with pytest.raises(GrammarRejected):
        Grammar(make_engine(tiny_llm_path).vocab, "root ::= (")


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "maxLength": 100_000},
        {"type": "array", "items": {"type": "string", "minLength": 5000}},
        {"type": "string", "pattern": "^a{1,100000}$"},
    ],
)
async def test_a_schema_asking_for_too_many_repetitions_is_refused_and_the_server_goes_on(start_llm_server, schema):
    """The converter writes each repetition out and llama.cpp recurses through them: a
    ``maxLength`` of 100000 crashed the process."""
    server = await start_llm_server()
    llm = client(server, max_retries=0)
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(BadRequestError, match="repetitions"):
        await llm.chat.completions.create(model="m", messages=QUESTION, response_format=response_format)
    after = await llm.chat.completions.create(model="m", messages=QUESTION, max_tokens=5, temperature=0)
    assert after.choices[0].finish_reason == "length"


async def test_a_schema_whose_grammar_is_too_large_is_refused(start_llm_server):
    lengths = {f"p{i}": {"type": "string", "maxLength": 1000 - i} for i in range(60)}
    schema = {"type": "object", "properties": lengths, "required": list(lengths)}
    server = await start_llm_server()
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(BadRequestError, match="characters"):
        await client(server, max_retries=0).chat.completions.create(
            model="m", messages=QUESTION, response_format=response_format
        )


async def test_a_schema_no_token_can_continue_fails_its_request_and_the_server_goes_on(start_llm_server):
    """The empty range ``[b-a]`` allows nothing: accepting a token anyway would abort the
    whole process inside llama.cpp."""
    server = await start_llm_server()
    llm = client(server, max_retries=0)
    impossible = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^x[b-a]$"}},
    }
    with pytest.raises(InternalServerError, match="can continue the answer"):
        await llm.chat.completions.create(model="m", messages=QUESTION, max_tokens=20, response_format=impossible)
    after = await llm.chat.completions.create(model="m", messages=QUESTION, max_tokens=5, temperature=0)
    assert after.choices[0].finish_reason == "length"
