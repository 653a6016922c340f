"""trim_conversation: a conversation past its budget loses its oldest turns."""

from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.utils.context.llm_context_summarization import LLMContextSummarizationUtil

from pipecat_nvidia.history import trim_conversation

SYSTEM = {"role": "system", "content": "You are a voice assistant."}


def turns(count: int) -> list[dict]:
    """``count`` turns of about 100 estimated tokens each."""
    messages = []
    for i in range(count):
        messages.append({"role": "user", "content": f"question {i} " + "word " * 40})
        messages.append({"role": "assistant", "content": f"answer {i} " + "word " * 20})
    return messages


def test_a_conversation_within_its_budget_passes_untouched():
    messages = [SYSTEM, *turns(3)]
    context = LLMContext(messages=list(messages))
    trim_conversation(context, max_tokens=1000)
    assert context.messages == messages


def test_past_its_budget_the_oldest_turns_go_down_to_half_of_it():
    context = LLMContext(messages=[SYSTEM, *turns(20)])
    assert _estimate(context.messages) > 1000
    trim_conversation(context, max_tokens=1000)
    kept = context.messages
    assert kept[0] == SYSTEM and kept[1]["role"] == "user"
    assert _estimate(kept[1:]) <= 500
    assert kept[-1]["content"].startswith("answer 19"), "the latest turns stay"
    assert len(kept) > 5


def test_a_large_system_prompt_does_not_make_every_turn_trim():
    """Each trim changes the conversation's beginning, and the server evaluates all of it
    again: the turns go down to half the room the prompt leaves."""
    system = {"role": "system", "content": "rule " * 2000}
    context = LLMContext(messages=[system])
    trims = 0
    for message in turns(60):
        context.add_message(message)
        before = len(context.messages)
        trim_conversation(context, max_tokens=4000)
        trims += len(context.messages) < before
    assert _estimate([system]) > 2000
    assert _estimate(context.messages) <= 4000 and 0 < trims <= 10


def test_a_tool_result_is_never_kept_without_its_call():
    """The cut falls at a user message: cutting at the latest message that fits would
    keep the tool's result and drop its call."""
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '"' + "x" * 200 + '"'}}
    messages = [
        {"role": "user", "content": "word " * 160},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "found it"},
        {"role": "assistant", "content": "Here it is, the thing you asked for."},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    half = 100
    assert _estimate(messages[2:]) <= half < _estimate(messages[1:])
    context = LLMContext(messages=list(messages))
    trim_conversation(context, max_tokens=2 * half)
    assert context.messages == messages[4:]


def test_a_turn_too_long_on_its_own_keeps_its_question_and_latest_tool_rounds():
    """A long run of tool calls has no later user message to cut at."""
    question = {"role": "user", "content": "Plan my trip."}
    rounds = []
    for i in range(20):
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
        rounds.append({"role": "assistant", "content": "", "tool_calls": [call]})
        rounds.append({"role": "tool", "tool_call_id": f"call_{i}", "content": f"result {i} " + "word " * 40})
    context = LLMContext(messages=[SYSTEM, *turns(3), question, *rounds])
    trim_conversation(context, max_tokens=1000)
    kept = context.messages
    latest = kept[2:]
    assert kept[:2] == [SYSTEM, question] and latest == rounds[-len(latest) :]
    assert latest[0]["role"] == "assistant", "a round is kept whole, its call with its result"
    assert 2 < len(latest) < len(rounds) and _estimate(kept[1:]) <= 500


def _estimate(messages: list[dict]) -> int:
    return LLMContextSummarizationUtil.estimate_context_tokens(LLMContext(messages=messages))
