"""The part of OpenAI's chat completions request this server understands.

Unknown fields are accepted and ignored, as other OpenAI-compatible servers do, so that
stock clients (Pipecat's ``OpenAILLMService``, the ``openai`` package) work unchanged.
Known fields asking for what the server cannot do (several choices, images) are refused
rather than ignored, since ignoring them would answer something else than was asked.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from servers.llm.logprobs import MAX_TOP_LOGPROBS

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


class StreamOptions(BaseModel):
    include_usage: bool = False


class NvExt(BaseModel):
    """NVIDIA NIM's extensions to the request, the ones this server has."""

    model_config = ConfigDict(extra="ignore")

    max_thinking_tokens: int | None = Field(default=None, ge=0)
    """With reasoning on, the reasoning closes after about this many tokens."""


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    """False: the answer ends after its first tool call."""
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    """vLLM's and llama.cpp's: -1 or 0 draws from every token; default the server's ``--top-k``."""
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    """Token ids (as JSON keys: text) to the bias added to their logits."""
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stop: str | list[str] | None = None
    n: Literal[1] | None = None
    response_format: dict[str, Any] | None = None
    """Its grammar is made off the event loop by the server (large schemas take seconds)."""
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """``{"enable_thinking": true}`` turns reasoning on (off by default), as with vLLM."""
    nvext: NvExt | None = None

    @field_validator("messages")
    @classmethod
    def _messages_are_text_chat(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every message has a role, text content and well-formed tool calls (the template and
        the prefix cache read them); content given as parts becomes the text it holds."""
        for i, message in enumerate(messages):
            _check_message(message, i)
        return [
            {**m, "content": _text_of(m["content"], i)} if isinstance(m.get("content"), list) else m
            for i, m in enumerate(messages)
        ]

    @field_validator("tools")
    @classmethod
    def _tools_are_functions(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(tools or ()):
            function = tool.get("function")
            if not (
                isinstance(function, dict)
                and isinstance(function.get("name"), str)
                and function["name"]
                and isinstance(function.get("parameters") or {}, dict)
            ):
                raise ValueError(f"tool {i} needs a function with a name (and its parameters as an object)")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _a_known_tool_choice(cls, choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        named = isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str)
        if not (named or choice in (None, "auto", "none", "required")):
            raise ValueError('must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')
        return choice

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice not in (None, "auto", "none")

    @property
    def parallel_calls(self) -> bool:
        """Several tool calls may answer (unless ``parallel_tool_calls`` is false)."""
        return self.parallel_tool_calls is not False

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: logprobs must be true to ask for them")
        return self

    @property
    def logprobs_alternatives(self) -> int | None:
        """How many alternatives to list per token; None: no log probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _structured_output_alone(self) -> ChatCompletionRequest:
        if self.response_format is None or self.response_format.get("type") == "text":
            return self
        if self.tools and self.tool_choice != "none":
            raise ValueError("response_format: JSON answers and tools cannot be asked for together")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def enable_thinking(self) -> bool:
        return bool(self.chat_template_kwargs.get("enable_thinking", False))

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, stop: str | list[str] | None) -> list[str]:
        """One text or several, as a list; bounded, since each token's text is checked
        against every sequence."""
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are taken")
        if not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has 1 to {MAX_STOP_CHARS} characters")
        return stops


def _check_message(message: dict[str, Any], index: int) -> None:
    if message.get("role") not in ("system", "developer", "user", "assistant", "tool"):
        raise ValueError(f"message {index} has no valid role")
    if not isinstance(message.get("content"), str | list | None):
        raise ValueError(f"message {index}: content must be text, a list of text parts or null")
    calls = message.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise ValueError(f"message {index}: tool_calls must be a list")
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(function.get("arguments"), str | dict)
        ):
            raise ValueError(
                f"message {index}: each tool call needs a function with a name and arguments (JSON text or an object)"
            )


def _text_of(parts: list[Any], index: int) -> str:
    """The text of content given as OpenAI's parts; other kinds of part (images, audio)
    are refused."""
    texts = []
    for part in parts:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"message {index}: only text content parts are supported")
        texts.append(part["text"])
    return "".join(texts)
