"""The LLM engine on a tiny random llama GGUF: chunked decoding, prefix reuse, cancel."""

import pytest
from llama_cpp import LLAMA_SPLIT_MODE_NONE

from servers.llm.chat import OutputSplitter
from servers.llm.engine import ChatRequest, ContextOverflow, LlmDelta, LLMEngine, LlmFinished
from servers.llm.model import GgufSource, load_llama
from servers.llm.random_model import CHAT_TEMPLATE, write_random_llama_gguf
from tests.llm.helpers import SYSTEM, evaluated_tokens, make_engine, make_llm, run
from tests.llm.scripted_model import write_scripted_llama_gguf

QUESTION = [SYSTEM, {"role": "user", "content": "hello world, what is the weather?"}]
CLEAN_REPLY_TOKENS = 12
"""The tiny model's answer to QUESTION writes a (malformed, dropped) tool call from its 15th
token on: a reply the cache can be continued through stops short of it."""


def reference_content(path, engine, messages, max_tokens: int) -> str:
    """llama-cpp-python's own one-shot greedy generation of the same prompt, split the same way."""
    llm = make_llm(path)
    prompt = engine.template.render(messages)
    tokens = []
    for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True), temp=0.0):
        if llm.token_eos() == token or len(tokens) == max_tokens:
            break
        tokens.append(token)
    splitter = OutputSplitter()
    text = llm.detokenize(tokens).decode("utf-8", errors="replace")
    return splitter.push(text).content + splitter.finish().content


@pytest.mark.parametrize(("first", "segment"), [(1, 1), (3, 5), (8, 16)])
def test_decoding_in_segments_equals_one_shot_generation(tiny_llm_path, first, segment):
    engine = make_engine(tiny_llm_path, first_segment_tokens=first, segment_tokens=segment)
    content, finished = run(engine, ChatRequest(QUESTION, max_tokens=40))
    assert finished.finish_reason == "length" and finished.usage.completion_tokens == 40
    assert content == reference_content(tiny_llm_path, engine, QUESTION, 40)


def test_first_unit_is_the_short_first_segment(tiny_llm_path):
    engine = make_engine(tiny_llm_path, first_segment_tokens=4, segment_tokens=16)
    engine.submit(ChatRequest(QUESTION, max_tokens=40), lambda event: None)
    assert engine.queue_state().first_pending
    first = engine.step()
    assert first.first and first.tokens == 4 and first.prompt_tokens > 0 and first.queue_wait_s is not None
    assert not engine.queue_state().first_pending and engine.queue_state().generating
    assert engine.step().tokens == 16


def test_next_turn_evaluates_only_its_new_tokens(tiny_llm_path):
    engine = make_engine(tiny_llm_path)
    llm = engine._llm
    reply, first = run(engine, ChatRequest(QUESTION, max_tokens=CLEAN_REPLY_TOKENS))
    turn = [*QUESTION, {"role": "assistant", "content": reply}, {"role": "user", "content": "and the city?"}]
    before = evaluated_tokens(llm)
    content, second = run(engine, ChatRequest(turn, max_tokens=12))
    new_prompt_tokens = second.usage.prompt_tokens - second.usage.cached_tokens
    assert second.usage.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    # llama.cpp's own counters: the new turn's prompt tokens and the 12 generated ones.
    assert evaluated_tokens(llm) - before == new_prompt_tokens + 12


def test_a_reused_prefix_continues_exactly_as_a_full_evaluation(tiny_llm_path):
    def second_turn(forget_cache: bool):
        engine = make_engine(tiny_llm_path)
        reply, _ = run(engine, ChatRequest(QUESTION, max_tokens=30))
        if forget_cache:
            engine._llm.reset()
        turn = [*QUESTION, {"role": "assistant", "content": reply}, {"role": "user", "content": "and the city?"}]
        return run(engine, ChatRequest(turn, max_tokens=20))

    reused, reused_end = second_turn(forget_cache=False)
    evaluated, evaluated_end = second_turn(forget_cache=True)
    assert reused_end.usage.cached_tokens > 0 and evaluated_end.usage.cached_tokens == 0
    assert reused == evaluated


def test_a_conversation_that_diverges_from_the_cache_is_evaluated_from_the_divergence(tiny_llm_path):
    """After a barge-in the client's context holds less than was generated: the engine
    rolls back to the common prefix and answers as a fresh engine would."""
    engine = make_engine(tiny_llm_path)
    reply, first = run(engine, ChatRequest(QUESTION, max_tokens=30))
    turn = [*QUESTION, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and the city?"}]
    content, second = run(engine, ChatRequest(turn, max_tokens=12))
    assert 0 < second.usage.cached_tokens <= first.usage.prompt_tokens
    assert content == run(make_engine(tiny_llm_path), ChatRequest(turn, max_tokens=12))[0]


def test_a_stop_sequence_ends_the_answer_before_it(tiny_llm_path):
    whole, _ = run(make_engine(tiny_llm_path), ChatRequest(QUESTION, max_tokens=30))
    stop = whole[10:14]
    content, finished = run(make_engine(tiny_llm_path), ChatRequest(QUESTION, max_tokens=30, stop=(stop,)))
    assert (content, finished.finish_reason) == (whole[: whole.index(stop)], "stop")


def test_the_turn_after_a_stop_sequence_sees_the_reply_as_the_client_has_it(tiny_llm_path):
    """The cache holds the stop sequence the model said; the next turn is not resumed
    from there but from the user turn before it, as a fresh engine would render it."""
    engine = make_engine(tiny_llm_path)
    whole, _ = run(engine, ChatRequest(QUESTION, max_tokens=30))
    reply, _ = run(engine, ChatRequest(QUESTION, max_tokens=30, stop=(whole[10:14],)))
    turn = [*QUESTION, {"role": "assistant", "content": reply}, {"role": "user", "content": "and the city?"}]
    content, second = run(engine, ChatRequest(turn, max_tokens=12))
    fresh, fresh_end = run(make_engine(tiny_llm_path), ChatRequest(turn, max_tokens=12))
    assert second.usage.cached_tokens > 0
    assert (second.usage.prompt_tokens, content) == (fresh_end.usage.prompt_tokens, fresh)


def test_a_reply_sent_back_with_other_whitespace_continues_the_cache_through_it(tiny_llm_path):
    """Clients trim or join the text they were streamed."""
    engine = make_engine(tiny_llm_path)
    reply, first = run(engine, ChatRequest(QUESTION, max_tokens=CLEAN_REPLY_TOKENS))
    as_kept = f"  {' '.join(reply.split())}\n"
    turn = [*QUESTION, {"role": "assistant", "content": as_kept}, {"role": "user", "content": "and the city?"}]
    _, second = run(engine, ChatRequest(turn, max_tokens=4))
    assert second.usage.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


@pytest.mark.parametrize("roll_back", [True, False], ids=["rolls-back", "cannot-roll-back"])
def test_an_earlier_message_edited_in_its_whitespace_alone_is_answered_as_edited(tiny_llm_path, roll_back):
    """Code, lists, indentation: whitespace is a user's or a system prompt's text too."""
    engine = make_engine(tiny_llm_path, roll_back=roll_back)
    reply, _ = run(engine, ChatRequest(QUESTION, max_tokens=30))
    edited = [SYSTEM, {"role": "user", "content": "hello\nworld,\n\n    what is the weather?"}]
    turn = [*edited, {"role": "assistant", "content": reply}, {"role": "user", "content": "and the city?"}]
    content, _ = run(engine, ChatRequest(turn, max_tokens=12))
    assert content == run(make_engine(tiny_llm_path, roll_back=roll_back), ChatRequest(turn, max_tokens=12))[0]


CHECKS_THE_WEATHER = [
    "Let",
    " me",
    " check",
    ".",
    "<tool_call>",
    '{"name": "get_weather", "arguments": {}}',
    "</tool_call>",
]


@pytest.mark.parametrize("max_tokens", [None, 5], ids=["call-dropped", "call-cut-by-max-tokens"])
def test_the_turn_after_a_call_the_client_never_got_sees_the_reply_as_the_client_has_it(tmp_path, max_tokens):
    """A call of a tool the request does not offer is dropped, and one cut off (by
    ``max_tokens``, or a barge-in) is never sent: the cache holds its text, and the next
    turn must not be answered from a history with a call the client does not have."""
    path = write_scripted_llama_gguf(tmp_path / "checks.gguf", CHECKS_THE_WEATHER)
    engine = make_engine(path)
    reply, first = run(engine, ChatRequest(QUESTION, max_tokens=max_tokens))
    assert (reply, first.tool_calls) == ("Let me check.", ())
    turn = [*QUESTION, {"role": "assistant", "content": reply}, {"role": "user", "content": "and?"}]
    _, second = run(engine, ChatRequest(turn, max_tokens=1))
    fresh = make_engine(path)
    _, fresh_end = run(fresh, ChatRequest(turn, max_tokens=1))
    assert second.usage.cached_tokens > 0
    prompt = second.usage.prompt_tokens
    assert (prompt, engine._llm._input_ids[:prompt].tolist()) == (
        fresh_end.usage.prompt_tokens,
        fresh._llm._input_ids[: fresh_end.usage.prompt_tokens].tolist(),
    )


def test_a_model_that_cannot_roll_back_resumes_a_diverged_conversation_from_the_last_user_turn(tiny_llm_path):
    """What a hybrid Mamba model does after a barge-in: restore the state snapshot taken at
    the end of the previous user turn, evaluate only the reply as the client has it and
    the new turn, and answer exactly as a fresh engine would."""
    engine = make_engine(tiny_llm_path, roll_back=False)
    llm = engine._llm
    _, first = run(engine, ChatRequest(QUESTION, max_tokens=30))
    user_turn_end = len(
        llm.tokenize(
            engine.template.render(QUESTION, add_generation_prompt=False).encode(), add_bos=False, special=True
        )
    )
    turn = [*QUESTION, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and the city?"}]
    before = evaluated_tokens(llm)
    content, second = run(engine, ChatRequest(turn, max_tokens=12))
    assert second.usage.cached_tokens == user_turn_end
    assert evaluated_tokens(llm) - before == second.usage.prompt_tokens - user_turn_end + 12
    assert content == run(make_engine(tiny_llm_path), ChatRequest(turn, max_tokens=12))[0]


def test_a_model_that_cannot_roll_back_starts_a_different_conversation_over(tiny_llm_path):
    engine = make_engine(tiny_llm_path, roll_back=False)
    run(engine, ChatRequest(QUESTION, max_tokens=30))
    other = [SYSTEM, {"role": "user", "content": "the weather"}]
    content, finished = run(engine, ChatRequest(other, max_tokens=12))
    assert finished.usage.cached_tokens == 0
    assert content == run(make_engine(tiny_llm_path), ChatRequest(other, max_tokens=12))[0]


def test_cancel_stops_a_running_request_before_its_next_token(tiny_llm_path):
    engine = make_engine(tiny_llm_path, first_segment_tokens=4)
    events = []
    rid = engine.submit(ChatRequest(QUESTION, max_tokens=100), events.append)
    engine.step()
    engine.cancel(rid)
    stats = engine.step()
    assert stats.tokens == 0 and not engine.has_work()
    finished = events[-1]
    assert isinstance(finished, LlmFinished) and finished.finish_reason == "cancelled"
    assert finished.usage.completion_tokens == 4


def test_a_cancelled_queued_request_never_runs(tiny_llm_path):
    engine = make_engine(tiny_llm_path)
    first, second = [], []
    engine.submit(ChatRequest(QUESTION, max_tokens=5), first.append)
    rid = engine.submit(ChatRequest(QUESTION, max_tokens=5), second.append)
    engine.cancel(rid)
    engine.run_until_idle()
    assert first[-1].finish_reason == "length"
    assert [type(e) for e in second] == [LlmFinished] and second[0].finish_reason == "cancelled"


def test_max_queued_counts_the_requests_waiting_behind_the_running_one(tiny_llm_path):
    engine = make_engine(tiny_llm_path, max_queued=1)
    ask = ChatRequest(QUESTION, max_tokens=50)
    engine.submit(ask, lambda event: None)
    engine.submit(ask, lambda event: None)
    with pytest.raises(OverflowError):
        engine.submit(ask, lambda event: None)
    engine.step()
    with pytest.raises(OverflowError):
        engine.submit(ask, lambda event: None)


def test_an_idle_engine_takes_a_request_even_with_no_room_to_wait(tiny_llm_path):
    engine = make_engine(tiny_llm_path, max_queued=0)
    engine.submit(ChatRequest(QUESTION, max_tokens=5), lambda event: None)
    with pytest.raises(OverflowError):
        engine.submit(ChatRequest(QUESTION, max_tokens=5), lambda event: None)


def test_a_cancelled_waiting_request_leaves_its_place(tiny_llm_path):
    engine = make_engine(tiny_llm_path, max_queued=1)
    engine.submit(ChatRequest(QUESTION, max_tokens=50), lambda event: None)
    engine.step()
    engine.cancel(engine.submit(ChatRequest(QUESTION, max_tokens=5), lambda event: None))
    engine.submit(ChatRequest(QUESTION, max_tokens=5), lambda event: None)


def test_the_turn_after_a_barge_in_is_urgent_while_the_cut_answer_ends(tiny_llm_path):
    engine = make_engine(tiny_llm_path)
    cut = engine.submit(ChatRequest(QUESTION, max_tokens=50), lambda event: None)
    engine.step()
    engine.cancel(cut)
    engine.submit(ChatRequest(QUESTION, max_tokens=5), lambda event: None)
    assert engine.queue_state().first_pending


def test_reasoning_is_off_unless_asked_for(tiny_llm_path):
    engine = make_engine(tiny_llm_path)
    assert engine.template.render(QUESTION).endswith("<think>\n\n</think>\n\n")
    assert not engine.template.render(QUESTION, enable_thinking=True).endswith("</think>\n\n")


def test_tools_are_rendered_into_the_prompt(tiny_llm_path):
    engine = make_engine(tiny_llm_path)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    assert '"name": "get_weather"' in engine.template.render(QUESTION, tools=[tool])


def test_a_prompt_longer_than_the_context_is_refused(tiny_llm_path):
    engine = make_engine(tiny_llm_path, context_size=256)
    with pytest.raises(ContextOverflow):
        engine.submit(ChatRequest([{"role": "user", "content": "hello world " * 200}]), lambda event: None)


def test_the_context_is_the_size_asked_for_though_llama_cpp_pads_it(tiny_llm_path):
    engine = make_engine(tiny_llm_path, context_size=300)
    assert engine.context_size == 300 < engine._llm.n_ctx()
    with pytest.raises(ContextOverflow):
        engine.prepare(ChatRequest([SYSTEM, {"role": "user", "content": "hello world " * 140}]))


def test_an_answer_stops_at_the_context_asked_for(tiny_llm_path):
    engine = make_engine(tiny_llm_path, context_size=300)
    request = ChatRequest([SYSTEM, {"role": "user", "content": "hello world " * 125}], max_tokens=100)
    prompt = len(engine.prepare(request).prompt)
    content, finished = run(engine, request)
    assert finished.error is None and finished.finish_reason == "length"
    assert finished.usage.completion_tokens == 300 - prompt
    assert engine._llm.n_tokens <= 300


def test_deltas_stream_before_the_request_finishes(tiny_llm_path):
    engine = make_engine(tiny_llm_path, first_segment_tokens=8)
    events = []
    engine.submit(ChatRequest(QUESTION, max_tokens=40), events.append)
    engine.step()
    assert events and all(isinstance(e, LlmDelta) for e in events)


def test_a_unit_with_a_time_budget_generates_what_fits_and_the_text_goes_on_exactly(tiny_llm_path):
    """A scheduler may hand the LLM a gap before a due ASR chunk: the unit stops early (one
    token at the least) and the next unit continues the same text."""
    engine = make_engine(tiny_llm_path, first_segment_tokens=4, segment_tokens=16)
    events: list = []
    engine.submit(ChatRequest(QUESTION, max_tokens=40), events.append)
    assert engine.step().tokens == 4
    assert engine.step(budget_s=0.0).tokens == 1
    assert engine.step(budget_s=60.0).tokens == 16
    engine.run_until_idle()
    content = "".join(e.content for e in events if isinstance(e, LlmDelta))
    assert content == reference_content(tiny_llm_path, engine, QUESTION, 40)


def test_a_template_that_refuses_the_cached_conversation_alone_still_answers(tmp_path):
    """Some chat templates refuse a conversation that does not end with the user. The
    engine renders the cached one (ending with the reply) only to reuse its tokens: the
    request goes on from the end of the previous user turn instead."""
    strict = "{%- if messages[-1].role == 'assistant' %}{{ raise_exception('end with the user') }}{% endif %}"
    engine = make_engine(write_random_llama_gguf(tmp_path / "strict.gguf", chat_template=strict + CHAT_TEMPLATE))
    reply, first = run(engine, ChatRequest(QUESTION, max_tokens=4))
    follow_up = [*QUESTION, {"role": "assistant", "content": reply}, {"role": "user", "content": "and tomorrow?"}]
    _, finished = run(engine, ChatRequest(follow_up, max_tokens=4))
    assert finished.finish_reason == "length"
    assert finished.usage.cached_tokens >= first.usage.prompt_tokens - _generation_prompt_tokens(engine, QUESTION)


def test_a_model_that_cannot_roll_back_resumes_a_later_cut_reply_from_its_user_turn(tiny_llm_path):
    """The cache holds earlier replies as generated, which need not be the tokens their text
    renders to (random ones here): after a barge-in on the second reply, the third turn
    still continues from the end of the second user turn, where the snapshot was taken."""
    engine = make_engine(tiny_llm_path, roll_back=False)
    reply, _ = run(engine, ChatRequest(QUESTION, max_tokens=30))
    second_turn = [*QUESTION, {"role": "assistant", "content": reply}, {"role": "user", "content": "and the city?"}]
    _, second = run(engine, ChatRequest(second_turn, max_tokens=30))
    third_turn = [*second_turn, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "the weather"}]
    _, third = run(engine, ChatRequest(third_turn, max_tokens=12))
    assert third.usage.cached_tokens == second.usage.prompt_tokens - _generation_prompt_tokens(engine, second_turn)


def test_a_model_that_cannot_roll_back_resumes_after_its_reply_when_the_eos_is_not_the_end_of_turn(tmp_path):
    """Nemotron's GGUF names ``</s>`` its eos while its template closes a turn with
    ``<|im_end|>``: the cached reply must close as the template closes it, or every next
    turn re-evaluates the reply from the last user turn."""
    engine = make_engine(write_random_llama_gguf(tmp_path / "eos.gguf", eos_token_id=2), roll_back=False)
    assert engine._llm.token_eos() == 2
    reply, first = run(engine, ChatRequest(QUESTION, max_tokens=CLEAN_REPLY_TOKENS))
    assert first.finish_reason == "length"
    turn = [*QUESTION, {"role": "assistant", "content": reply}, {"role": "user", "content": "and the city?"}]
    _, second = run(engine, ChatRequest(turn, max_tokens=4))
    assert second.usage.cached_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_reasoning_off_closes_a_reasoning_block_the_template_always_opens(tmp_path):
    always_thinks = CHAT_TEMPLATE.replace(
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}",
        "<think>\n",
    )
    assert always_thinks != CHAT_TEMPLATE
    engine = make_engine(write_random_llama_gguf(tmp_path / "always.gguf", chat_template=always_thinks))
    assert engine.template.render(QUESTION).endswith("<think>\n</think>")
    events: list = []
    engine.submit(ChatRequest(QUESTION, max_tokens=12), events.append)
    engine.run_until_idle()
    deltas = [e for e in events if isinstance(e, LlmDelta)]
    assert "".join(e.content for e in deltas) and not any(e.reasoning for e in deltas)


def test_cached_reasoning_never_takes_the_answers_room(tmp_path):
    """A cached reply holds its reasoning, which the template leaves out of the history:
    where reusing it would leave the answer less room than the rendered prompt does, the
    rendered prompt is evaluated instead."""
    thinking = CHAT_TEMPLATE.replace(
        "{% if enable_thinking is defined and enable_thinking is false %}",
        "{% if enable_thinking %}<think>\n{% elif enable_thinking is defined and enable_thinking is false %}",
    )
    engine = make_engine(write_random_llama_gguf(tmp_path / "thinking.gguf", chat_template=thinking), context_size=512)
    events: list = []
    engine.submit(ChatRequest(QUESTION, max_tokens=200, enable_thinking=True), events.append)
    engine.run_until_idle()
    assert any(e.reasoning for e in events if isinstance(e, LlmDelta)), "the random model reasoned"
    reply = "".join(e.content for e in events if isinstance(e, LlmDelta))
    turn = [*QUESTION, {"role": "assistant", "content": reply}, {"role": "user", "content": "and the city?"}]
    rendered = len(engine._tokenize(engine.template.render(turn, enable_thinking=True)))
    room = engine.context_size - rendered
    _, finished = run(engine, ChatRequest(turn, max_tokens=room, enable_thinking=True))
    assert finished.usage.prompt_tokens == rendered
    assert finished.finish_reason == "stop" or finished.usage.completion_tokens == room


def _generation_prompt_tokens(engine: LLMEngine, messages: list[dict]) -> int:
    """Tokens of what the template adds after ``messages`` to prompt the reply."""
    whole, before = engine.template.render(messages), engine.template.render(messages, add_generation_prompt=False)
    return len(engine._tokenize(whole[len(before) :]))


def test_a_token_longer_than_32_bytes_is_said_whole(tmp_path):
    """llama-cpp-python's ``detokenize`` gives nothing for such a token."""
    piece = "Certainly, here is the forecast for tomorrow."
    engine = make_engine(write_scripted_llama_gguf(tmp_path / "long.gguf", ["Well. ", piece]))
    content, finished = run(engine, ChatRequest(QUESTION))
    assert content == "Well. " + piece and finished.finish_reason == "stop"


def test_a_model_placed_on_one_gpu_loads_and_answers(tiny_llm_path):
    """``main_gpu`` asks llama.cpp for no split across GPUs (a CPU build runs as before)."""
    llm = load_llama(GgufSource(path=str(tiny_llm_path)), context_size=1024, gpu_layers=0, main_gpu=0)
    assert (llm.model_params.split_mode, llm.model_params.main_gpu) == (LLAMA_SPLIT_MODE_NONE, 0)
    engine = LLMEngine(llm)
    _, finished = run(engine, ChatRequest(QUESTION, max_tokens=3))
    assert finished.finish_reason == "length"
