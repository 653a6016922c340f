"""Keeping the conversation an LLM gets within a token budget.

Every LLM request carries the whole conversation, so a long call outgrows the model's
context: the server then refuses each request as too long and the bot falls silent. Past
the budget the oldest turns are dropped, down to half the room the system messages leave,
at once. The LLM server
reuses its cache for a conversation that only grows, and dropping the oldest turns
changes its beginning: trimming a little on every turn would have the server evaluate
the whole conversation again on every turn; halving it does so once in a while.
"""

from __future__ import annotations

from loguru import logger
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.utils.context.llm_context_summarization import LLMContextSummarizationUtil

DEFAULT_HISTORY_TOKENS = 4096
"""Half the local host's LLM context (8192 tokens) by Pipecat's estimate of four
characters a token: room for the system prompt, the answer and an estimate that runs low."""


def trim_conversation(context: LLMContext, max_tokens: int) -> None:
    """Past ``max_tokens``, drop the oldest turns, in place, until the turns take at most
    half of what the leading system messages leave of it (they stay: half the budget,
    were they large, would be over it again at the next turn). What is kept starts with a
    user message, so no tool result loses its call. A latest turn too long on its own (a
    long run of tool calls) keeps its user message and its latest tool rounds."""
    messages = context.messages
    if _estimate(messages) <= max_tokens:
        return
    leading = 0
    while leading < len(messages) and _role(messages[leading]) == "system":
        leading += 1
    users = [i for i in range(leading, len(messages)) if _role(messages[i]) == "user"]
    if not users:
        return
    half = (max_tokens - _estimate(messages[:leading])) // 2
    kept = next((messages[i:] for i in users if _estimate(messages[i:]) <= half), None)
    if kept is None:
        kept = _latest_rounds(messages[users[-1] :], half)
    dropped = len(messages) - leading - len(kept)
    if dropped == 0:
        return
    logger.info(f"The conversation outgrew {max_tokens} tokens (estimated): dropping {dropped} of its oldest messages")
    context.set_messages([*messages[:leading], *kept])


def _latest_rounds(turn: list, max_tokens: int) -> list:
    """The turn's user message and as many of its latest rounds as fit (at least the last
    one). A round starts at an assistant message, and its tool results follow it."""
    rounds = [j for j in range(2, len(turn)) if _role(turn[j]) == "assistant"]
    start = next((j for j in rounds if _estimate([turn[0], *turn[j:]]) <= max_tokens), rounds[-1] if rounds else 1)
    return [turn[0], *turn[start:]]


def _estimate(messages: list) -> int:
    return LLMContextSummarizationUtil.estimate_context_tokens(LLMContext(messages=list(messages)))


def _role(message) -> str | None:
    return message.get("role") if isinstance(message, dict) else None
