"""ConversationWindow: keeps the conversation the LLM gets within a token budget.

Every LLM request carries the whole conversation, so a long call outgrows the model's
context: the server then refuses each request as too long and the bot falls silent. Past
the budget the oldest turns are dropped, down to half the budget at once. The LLM server
reuses its cache for a conversation that only grows, and dropping the oldest turns
changes its beginning: trimming a little on every turn would have the server evaluate
the whole conversation again on every turn; halving it does so once in a while.
"""

from __future__ import annotations

from loguru import logger
from pipecat.frames.frames import Frame, LLMContextFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.utils.context.llm_context_summarization import LLMContextSummarizationUtil

DEFAULT_HISTORY_TOKENS = 4096
"""Half the local host's LLM context (8192 tokens) by Pipecat's estimate of four
characters a token: room for the system prompt, the answer and an estimate that runs low."""


class ConversationWindow(FrameProcessor):
    """Put it between the user aggregator and the LLM. The context is trimmed in place,
    so the aggregators go on from the trimmed conversation."""

    def __init__(self, max_tokens: int = DEFAULT_HISTORY_TOKENS, **kwargs):
        if max_tokens < 2:
            raise ValueError("max_tokens must be at least 2")
        super().__init__(**kwargs)
        self._max_tokens = max_tokens

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            trim_conversation(frame.context, self._max_tokens)
        await self.push_frame(frame, direction)


def trim_conversation(context: LLMContext, max_tokens: int) -> None:
    """Past ``max_tokens``, drop the oldest turns until at most half of it is left (or only
    the last turn). The leading system messages stay, and what is kept starts with a user
    message, so no tool result loses its call."""
    if _estimate(context.messages) <= max_tokens:
        return
    messages = context.messages
    leading = 0
    while leading < len(messages) and _role(messages[leading]) == "system":
        leading += 1
    starts = [i for i in range(leading + 1, len(messages)) if _role(messages[i]) == "user"]
    if not starts:
        return
    start = next((i for i in starts if _estimate(messages[i:]) <= max_tokens // 2), starts[-1])
    logger.info(
        f"The conversation outgrew {max_tokens} tokens (estimated): dropping its {start - leading} oldest messages"
    )
    context.set_messages([*messages[:leading], *messages[start:]])


def _estimate(messages: list) -> int:
    return LLMContextSummarizationUtil.estimate_context_tokens(LLMContext(messages=list(messages)))


def _role(message) -> str | None:
    return message.get("role") if isinstance(message, dict) else None
