"""The part of OpenAI's chat completions request this server understands.

Unknown fields are accepted and ignored, as other OpenAI-compatible servers do, so that
stock clients (Pipecat's ``OpenAILLMService``, the ``openai`` package) work unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """``{"enable_thinking": true}`` turns reasoning on (off by default), as with vLLM."""

    @field_validator("messages")
    @classmethod
    def _messages_have_roles(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, message in enumerate(messages):
            if message.get("role") not in ("system", "developer", "user", "assistant", "tool"):
                raise ValueError(f"message {i} has no valid role")
        return messages

    @field_validator("stop")
    @classmethod
    def _no_stop_sequences(cls, stop: str | list[str] | None) -> None:
        if stop:
            raise ValueError("stop sequences are not supported")
        return None
