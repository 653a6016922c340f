"""Log probabilities of the generated tokens (OpenAI's ``logprobs``), on the tiny GGUF."""

import numpy as np
import pytest
from llama_cpp import Llama

from servers.llm.engine import ChatRequest, LlmDelta
from servers.llm.sampling import Sampling
from tests.llm.helpers import SYSTEM, make_engine
from tests.llm.scripted_model import SURE, write_scripted_llama_gguf
from tests.llm.test_server import QUESTION, client

MESSAGES = [SYSTEM, {"role": "user", "content": "hello world, what is the weather?"}]
SCRIPT = ["Fine", ",", " thanks", "."]


def generate(engine, request: ChatRequest) -> tuple[str, list]:
    events: list = []
    engine.submit(request, events.append)
    engine.run_until_idle()
    deltas = [e for e in events if isinstance(e, LlmDelta)]
    return "".join(d.content for d in deltas), [lp for d in deltas for lp in d.logprobs]


def test_each_tokens_log_probability_is_llama_cpps_own(tiny_llm_path):
    engine = make_engine(tiny_llm_path)
    _, logprobs = generate(engine, ChatRequest(MESSAGES, max_tokens=12, top_logprobs=3))
    reference = Llama(str(tiny_llm_path), n_ctx=1024, n_threads=1, flash_attn=True, logits_all=True, verbose=False)
    prompt = reference.tokenize(engine.template.render(MESSAGES).encode(), add_bos=False, special=True)
    expected = reference.create_completion(prompt, max_tokens=12, temperature=0.0, logprobs=3)["choices"][0]
    assert len(logprobs) == 12
    assert [lp.logprob for lp in logprobs] == pytest.approx(expected["logprobs"]["token_logprobs"], abs=1e-4)
    # Its alternatives are keyed by text, which merges byte tokens: the logits it kept instead.
    logits = reference.scores[len(prompt) - 1 : len(prompt) + 11].astype(np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    best = -np.sort(-log_softmax, axis=1)[:, :3]
    np.testing.assert_allclose([[value for _, value in lp.top] for lp in logprobs], best, atol=1e-4)


def test_the_answers_tokens_are_listed_likeliest_first_without_the_end_of_turn(tmp_path):
    engine = make_engine(write_scripted_llama_gguf(tmp_path / "fine.gguf", SCRIPT))
    content, logprobs = generate(engine, ChatRequest(MESSAGES, top_logprobs=2))
    assert content == "Fine, thanks." and [lp.token.decode() for lp in logprobs] == SCRIPT
    for lp in logprobs:
        assert lp.top[0] == (lp.token, lp.logprob) and lp.logprob == pytest.approx(0.0, abs=1e-3)
        assert lp.top[1][1] == pytest.approx(-SURE, abs=0.1), "every other follower has logit 0"


def test_they_are_the_models_not_the_samplings(tiny_llm_path):
    """Temperature changes which token is drawn, not how likely the model found each."""
    engine = make_engine(tiny_llm_path)
    _, greedy = generate(engine, ChatRequest(MESSAGES, max_tokens=1, top_logprobs=5))
    hot = Sampling(temperature=1.8, top_k=0, seed=7)
    _, sampled = generate(engine, ChatRequest(MESSAGES, max_tokens=1, top_logprobs=5, sampling=hot))
    assert [t for t, _ in sampled[0].top] == [t for t, _ in greedy[0].top]
    assert [v for _, v in sampled[0].top] == pytest.approx([v for _, v in greedy[0].top], abs=1e-5)


def test_none_are_computed_unless_asked_for(tiny_llm_path):
    engine = make_engine(tiny_llm_path)
    content, logprobs = generate(engine, ChatRequest(MESSAGES, max_tokens=8))
    assert content and logprobs == []


@pytest.mark.slow
async def test_the_endpoint_lists_them_whole_and_streamed(start_llm_server, tmp_path):
    server = await start_llm_server(model=str(write_scripted_llama_gguf(tmp_path / "fine.gguf", SCRIPT)))
    llm = client(server)
    ask = {"model": "m", "messages": QUESTION, "logprobs": True, "top_logprobs": 2}
    whole = (await llm.chat.completions.create(**ask)).choices[0]
    chunks = [c.choices[0] async for c in await llm.chat.completions.create(**ask, stream=True) if c.choices]
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.content]
    assert [t.token for t in whole.logprobs.content] == SCRIPT and streamed == whole.logprobs.content
    assert all(len(t.top_logprobs) == 2 and bytes(t.bytes).decode() == t.token for t in streamed)
    plain = await llm.chat.completions.create(model="m", messages=QUESTION)
    assert plain.choices[0].logprobs is None
