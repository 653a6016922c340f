"""Nemotron through the local GPU host's OpenAI-compatible endpoint.

Pipecat's own ``OpenAILLMService`` does all the work (contexts, tools, interruptions); this
subclass only points it at the host and names the model. Anything OpenAI-compatible
(vLLM, NIM) can stand in for the host by changing ``base_url``. The host decodes a short
first segment before anything else so the TTS can start speaking early, and reasoning
is off unless the settings ask for it::

    NemotronLLMService(
        settings=NemotronLLMService.Settings(
            extra={"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}
        )
    )
"""

from __future__ import annotations

from pipecat.services.openai.llm import OpenAILLMService

DEFAULT_BASE_URL = "http://127.0.0.1:8082/v1"
DEFAULT_MODEL = "nemotron-3-nano"


class NemotronLLMService(OpenAILLMService):
    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str = "none",
        settings: OpenAILLMService.Settings | None = None,
        **kwargs,
    ):
        """``api_key`` is the host's ``--auth-token`` when it has one. ``settings`` change
        the defaults field by field: the model stays ``nemotron-3-nano`` unless they name one."""
        default_settings = OpenAILLMService.Settings(model=DEFAULT_MODEL)
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(base_url=base_url, api_key=api_key, settings=default_settings, **kwargs)
