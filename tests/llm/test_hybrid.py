"""The LLM engine on a tiny random hybrid model of Nemotron-3-Nano's architecture
(Mamba-2 + attention + MoE, llama.cpp's ``nemotron_h_moe``): llama.cpp cannot cut its
recurrent state back, so after a divergence the engine restores the state it saved at the
end of the last user turn, and each answer must be the one a fresh engine gives. Answers
are compared with their tokens' log probabilities: a wrong state moves them even where a
random model's text happens to stay the same."""

import ctypes
from collections.abc import Callable
from pathlib import Path

import pytest
from llama_cpp import llama_model_n_layer

from servers.llm.engine import ChatRequest, LlmDelta, LLMEngine, LlmFinished
from servers.llm.random_model import NemotronHShape, write_random_nemotron_h_gguf
from servers.llm.state import can_roll_back
from tests.llm.helpers import SYSTEM, evaluated_tokens, make_engine, make_llm, run

QUESTION = [SYSTEM, {"role": "user", "content": "hello world, what is the weather?"}]
FOLLOW_UP = {"role": "user", "content": "and the city?"}
ANSWER_TOKENS = 12


@pytest.fixture(scope="module")
def hybrid_path(tmp_path_factory) -> Path:
    return write_random_nemotron_h_gguf(tmp_path_factory.mktemp("hybrid_llm") / "tiny-nemotron-h.gguf")


def answer(engine: LLMEngine, messages: list[dict]) -> tuple[tuple[str, list[float]], LlmFinished]:
    """The answer's text and its tokens' log probabilities, and its end."""
    events: list = []
    engine.submit(ChatRequest(messages, max_tokens=ANSWER_TOKENS, top_logprobs=0), events.append)
    engine.run_until_idle()
    deltas = [e for e in events if isinstance(e, LlmDelta)]
    text = "".join(e.content for e in deltas)
    return (text, [token.logprob for e in deltas for token in e.logprobs]), events[-1]


def same_answer(reference: tuple[str, list[float]]) -> tuple[str, object]:
    """What equals the same text with the same log probabilities, within 1e-3: the prompt
    evaluated in other batches moves them by about 2e-4, a wrong state by 0.01 or more."""
    text, logprobs = reference
    return text, pytest.approx(logprobs, abs=1e-3)


def answer_from_an_empty_state(path: Path, history: Callable[[LLMEngine], object], turn: list[dict]):
    """``turn`` answered by a fresh engine that ran ``history`` first, so that its prompt
    holds the replies' tokens as generated, and then emptied its state."""
    scratch = make_engine(path)
    history(scratch)
    scratch._llm.reset()
    evaluated, finished = answer(scratch, turn)
    assert finished.usage.cached_tokens == 0
    return evaluated


def user_turn_end(engine: LLMEngine, messages: list[dict]) -> int:
    """Tokens of ``messages`` without the generation prompt: where the snapshot is taken."""
    return len(engine._tokenize(engine.template.render(messages, add_generation_prompt=False)))


def test_llama_cpp_cannot_cut_the_hybrid_state_back(hybrid_path):
    llm = make_llm(hybrid_path)
    llm.eval(llm.tokenize(b"hello world, what is the weather?", add_bos=False))
    assert not llm._ctx.kv_cache_seq_rm(-1, 4, -1)
    assert not can_roll_back(llm)


def test_the_engine_snapshots_a_hybrid_models_state_by_default(hybrid_path):
    engine = make_engine(hybrid_path)
    run(engine, ChatRequest(QUESTION, max_tokens=4))
    assert engine._snapshot is not None and len(engine._snapshot.tokens) == user_turn_end(engine, QUESTION)


def test_after_a_barge_in_the_turn_resumes_from_the_snapshot_and_answers_as_a_fresh_engine(hybrid_path):
    """The client's copy of the reply is shorter than what was generated: the state at the
    end of the user turn comes back, and only the cut reply and the new turn are evaluated."""
    engine = make_engine(hybrid_path)
    llm = engine._llm
    run(engine, ChatRequest(QUESTION, max_tokens=30))
    turn = [*QUESTION, {"role": "assistant", "content": "hello"}, FOLLOW_UP]
    before = evaluated_tokens(llm)
    said, finished = answer(engine, turn)
    assert finished.usage.cached_tokens == user_turn_end(engine, QUESTION)
    assert evaluated_tokens(llm) - before == finished.usage.prompt_tokens - finished.usage.cached_tokens + ANSWER_TOKENS
    assert said == same_answer(answer(make_engine(hybrid_path), turn)[0])


def test_a_snapshot_written_over_the_last_restores_its_own_turn(hybrid_path):
    """Each user turn's snapshot is written into the buffer of the one before; a barge-in
    on the second reply resumes from the second user turn, and answers as the same tokens
    evaluated from an empty state do."""

    def two_turns(engine: LLMEngine) -> tuple[list[dict], list]:
        reply, _ = run(engine, ChatRequest(QUESTION, max_tokens=30))
        snapshots = [engine._snapshot]
        second = [*QUESTION, {"role": "assistant", "content": reply}, FOLLOW_UP]
        second_reply, _ = run(engine, ChatRequest(second, max_tokens=30))
        snapshots.append(engine._snapshot)
        cut = {"role": "assistant", "content": second_reply[:3]}
        return [*second, cut, {"role": "user", "content": "why?"}], snapshots

    engine = make_engine(hybrid_path)
    third, (first, snapshot) = two_turns(engine)
    assert ctypes.addressof(snapshot.data) == ctypes.addressof(first.data)
    assert len(snapshot.tokens) > user_turn_end(engine, QUESTION)
    said, finished = answer(engine, third)
    assert finished.usage.cached_tokens == len(snapshot.tokens)
    assert said == same_answer(answer_from_an_empty_state(hybrid_path, two_turns, third))


def test_a_turn_that_extends_the_whole_reply_continues_the_state(hybrid_path):
    """No snapshot comes back: the state goes on from the reply as generated, and answers
    as the same tokens evaluated from an empty state do."""

    def second_turn(engine: LLMEngine) -> list[dict]:
        reply, _ = run(engine, ChatRequest(QUESTION, max_tokens=30))
        return [*QUESTION, {"role": "assistant", "content": reply}, FOLLOW_UP]

    engine = make_engine(hybrid_path)
    turn = second_turn(engine)
    held = engine._llm.n_tokens
    said, finished = answer(engine, turn)
    assert finished.usage.cached_tokens == held
    assert said == same_answer(answer_from_an_empty_state(hybrid_path, second_turn, turn))


def test_the_turn_after_a_cancelled_answer_answers_as_a_fresh_engine(hybrid_path):
    """The user barged in while the answer streamed: it is cancelled mid-way, and the
    client keeps the part that was spoken."""
    engine = make_engine(hybrid_path, first_segment_tokens=4)
    events: list = []
    rid = engine.submit(ChatRequest(QUESTION, max_tokens=30), events.append)
    engine.step()
    engine.cancel(rid)
    engine.run_until_idle()
    assert events[-1].finish_reason == "cancelled" and events[-1].usage.completion_tokens == 4
    streamed = "".join(e.content for e in events if isinstance(e, LlmDelta))
    turn = [*QUESTION, {"role": "assistant", "content": streamed[: len(streamed) // 2]}, FOLLOW_UP]
    said, finished = answer(engine, turn)
    assert finished.usage.cached_tokens == user_turn_end(engine, QUESTION)
    assert said == same_answer(answer(make_engine(hybrid_path), turn)[0])


def test_the_same_request_again_answers_the_same(hybrid_path):
    """The prompt's last token must be evaluated again for its logits: the state goes back
    to the end of the user turn."""
    engine = make_engine(hybrid_path)
    first, _ = answer(engine, QUESTION)
    again, finished = answer(engine, QUESTION)
    assert finished.usage.cached_tokens == user_turn_end(engine, QUESTION)
    assert again == same_answer(first)


def test_a_conversation_edited_before_the_snapshot_starts_over(hybrid_path):
    engine = make_engine(hybrid_path)
    reply, _ = run(engine, ChatRequest(QUESTION, max_tokens=30))
    edited = [SYSTEM, {"role": "user", "content": "hello world, what is the city?"}]
    turn = [*edited, {"role": "assistant", "content": reply}, FOLLOW_UP]
    said, finished = answer(engine, turn)
    assert finished.usage.cached_tokens == 0
    assert said == same_answer(answer(make_engine(hybrid_path), turn)[0])


def test_the_benchmarks_q8_0_writer_gives_the_shape_asked_for(tmp_path):
    """The GPU benchmarks' proxy is written this way at full size: quantized blocks drawn
    directly, a vocabulary padded to the real model's size."""
    shape = NemotronHShape(n_embd=128, head_dim=32, n_vocab=3000)
    llm = make_llm(write_random_nemotron_h_gguf(tmp_path / "q8.gguf", shape, q8_0=True))
    layers = llama_model_n_layer(llm._model.model)
    assert (llm.n_vocab(), llm.n_embd(), layers) == (3000, 128, len(shape.layers))
    _, finished = run(make_engine(llm.model_path), ChatRequest(QUESTION, max_tokens=8))
    assert finished.finish_reason == "length" and finished.usage.completion_tokens == 8
