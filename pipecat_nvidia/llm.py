"""Nemotron through the local GPU host's OpenAI-compatible endpoint.

Pipecat's own ``OpenAILLMService`` does all the work (contexts, tools, interruptions); this
subclass points it at the host, names the model, and keeps the conversation within the
host's context (``history_tokens``). Anything OpenAI-compatible
(vLLM, NIM) can stand in for the host by changing ``base_url``. The host decodes a short
first segment before anything else so the TTS can start speaking early. Reasoning is off
(each request says so: Nemotron 3's chat template reasons unless told not to, and vLLM
and NIM follow it) unless the settings ask for it, here for at most about 64 tokens::

    NemotronLLMService(settings=NemotronLLMService.Settings(extra=reasoning_extra(64)))
"""

from __future__ import annotations

import math

from pipecat.adapters.llm.services.open_ai_adapter import OpenAILLMInvocationParams
from pipecat.frames.frames import Frame, LLMContextFrame
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.openai.llm import OpenAILLMService

from pipecat_nvidia.history import DEFAULT_HISTORY_TOKENS, trim_conversation

DEFAULT_BASE_URL = "http://127.0.0.1:8082/v1"
DEFAULT_MODEL = "nemotron-3-nano"
REASONING_OVERRUN = 1.1
"""A reasoning limit closes the reasoning at a line's end within a tenth more tokens (the
host's rule, after NIM's)."""


def reasoning_extra(max_thinking_tokens: int | None = None) -> dict:
    """``Settings.extra`` that turns the model's reasoning on, closed after about
    ``max_thinking_tokens`` (None: no limit) by NIM's ``nvext`` field, which the host reads
    too. Reasoning is never spoken, but the answer waits for it. Servers count reasoning
    tokens against ``max_tokens``: ``NemotronLLMService`` adds the limit's to the answer's
    ``max_tokens``, so that the reasoning cannot use the answer's up."""
    body: dict = {"chat_template_kwargs": {"enable_thinking": True}}
    if max_thinking_tokens is not None:
        body["nvext"] = {"max_thinking_tokens": max_thinking_tokens}
    return {"extra_body": body}


class NemotronLLMService(OpenAILLMService):
    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str = "none",
        settings: OpenAILLMService.Settings | None = None,
        history_tokens: int | None = DEFAULT_HISTORY_TOKENS,
        **kwargs,
    ):
        """``api_key`` is the host's ``--auth-token`` when it has one. ``settings`` change
        the defaults field by field: the model stays ``nemotron-3-nano`` unless they name one.
        Past ``history_tokens`` (estimated) the conversation loses its oldest turns before a
        request (``pipecat_nvidia.history``); None sends it whole. The trimming happens
        here, not in a processor before the LLM, because the request that follows a tool
        result comes from the assistant aggregator, after the LLM."""
        if history_tokens is not None and history_tokens < 2:
            raise ValueError("history_tokens must be at least 2")
        self._history_tokens = history_tokens
        default_settings = OpenAILLMService.Settings(model=DEFAULT_MODEL)
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(base_url=base_url, api_key=api_key, settings=default_settings, **kwargs)

    def build_chat_completion_params(self, params_from_context: OpenAILLMInvocationParams) -> dict:
        params = super().build_chat_completion_params(params_from_context)
        # The host, vLLM and llama.cpp's server take top_k, which Pipecat's base leaves out.
        self._merge_extra_body(params, {"top_k": self._settings.top_k})
        # Settings.extra's extra_body (reasoning_extra) wins key by key, within the
        # template's arguments too: others given there leave reasoning off. A copy: the
        # settings' own dict stays as it was.
        extra_body = dict(params.get("extra_body") or {})
        given = extra_body.get("chat_template_kwargs") or {}
        extra_body["chat_template_kwargs"] = {"enable_thinking": False, **given}
        params["extra_body"] = extra_body
        thinking = (extra_body.get("nvext") or {}).get("max_thinking_tokens")
        if extra_body["chat_template_kwargs"]["enable_thinking"] and isinstance(thinking, int):
            for key in ("max_tokens", "max_completion_tokens"):
                if isinstance(params.get(key), int):
                    params[key] += math.ceil(REASONING_OVERRUN * thinking)
        return params

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, LLMContextFrame) and self._history_tokens is not None:
            trim_conversation(frame.context, self._history_tokens)
        await super().process_frame(frame, direction)
