"""A request's sampling fields, through the OpenAI-compatible endpoint.

The penalties and biases are checked on a bigram model whose logits are known: after
"la" it says "la" again (logit 1.0) unless something brings that under " lo" (0.5),
after which the turn ends. The cut-offs are checked on the random model: sampling hot
but from one candidate must choose what greedy decoding does.
"""

import openai
import pytest

from tests.llm.scripted_model import NEWLINE, SURE, write_bigram_llama_gguf
from tests.llm.test_server import QUESTION, client

LOOP = [(NEWLINE, "la", SURE), (NEWLINE, "li", SURE - 1), ("la", "la", 1.0), ("la", " lo", 0.5)]


@pytest.fixture
async def looping_server(start_llm_server, tmp_path):
    return await start_llm_server(model=str(write_bigram_llama_gguf(tmp_path / "loop.gguf", LOOP)))


async def _answer(server, max_tokens: int = 6, temperature: float = 0, **fields) -> tuple[str, str]:
    """The answer and its finish reason; fields the ``openai`` client lacks go as extra body."""
    known = {k: fields.pop(k) for k in ("presence_penalty", "frequency_penalty", "logit_bias", "seed") if k in fields}
    response = await client(server).chat.completions.create(
        model="m", messages=QUESTION, max_tokens=max_tokens, temperature=temperature, extra_body=fields, **known
    )
    return response.choices[0].message.content, response.choices[0].finish_reason


async def test_without_penalties_the_loop_goes_on(looping_server):
    assert await _answer(looping_server) == ("la" * 6, "length")


@pytest.mark.parametrize(
    ("fields", "answer"),
    [
        # 1.0 - 0.75 once "la" was said: " lo" (0.5) is likelier.
        ({"presence_penalty": 0.75}, "la lo"),
        # 1.0 - 0.3 per "la" said: under 0.5 after the second.
        ({"frequency_penalty": 0.3}, "lala lo"),
        # 1.0 / 2.5: under 0.5 after the first.
        ({"repetition_penalty": 2.5}, "la lo"),
    ],
)
async def test_penalties_break_the_loop_as_openai_defines_them(looping_server, fields, answer):
    assert await _answer(looping_server, **fields) == (answer, "stop")


async def test_a_logit_bias_of_minus_100_bans_a_token(looping_server):
    la = looping_server.engine._llm.tokenize(b"la", add_bos=False)
    assert len(la) == 1
    assert await _answer(looping_server, logit_bias={str(la[0]): -100}) == ("li", "stop")


async def test_a_logit_bias_for_a_token_the_model_lacks_is_refused(looping_server):
    with pytest.raises(openai.BadRequestError, match="not in the model's vocabulary"):
        await _answer(looping_server, logit_bias={"999999": 5})
    assert await _answer(looping_server) == ("la" * 6, "length")


HOT = {"temperature": 1.5, "seed": 3, "max_tokens": 24}


@pytest.mark.parametrize(
    ("settings", "fields"),
    [({"top_k": 1}, {}), ({}, {"top_k": 1}), ({}, {"min_p": 1.0})],
    ids=["server top_k 1", "request top_k 1", "request min_p 1"],
)
async def test_a_cut_off_to_one_candidate_samples_what_greedy_decoding_chooses(start_llm_server, settings, fields):
    server = await start_llm_server()
    greedy = await _answer(server, max_tokens=24)
    assert await _answer(server, **HOT) != greedy
    cut = await start_llm_server(**settings) if settings else server
    assert await _answer(cut, **HOT, **fields) == greedy
