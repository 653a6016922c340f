"""The conversation side of the LLM: prompts from the GGUF's chat template, and the
model's output split into spoken text, reasoning and tool calls as it streams."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class PromptRejected(ValueError):
    """The model's chat template cannot render these messages (it raised, or they do not fit it)."""


class ChatTemplate:
    """Renders messages (and tools) with the model's own Jinja chat template."""

    def __init__(self, template: str, *, bos_token: str, eos_token: str):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        # One formatter per add_generation_prompt, which it reads from an attribute of its
        # own: requests render on the event loop while the engine renders on its thread.
        self._formatters = {
            flag: Jinja2ChatFormatter(
                template=template, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=flag
            )
            for flag in (True, False)
        }

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        enable_thinking: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:
        import jinja2

        formatter = self._formatters[add_generation_prompt]
        try:
            prompt = formatter(
                messages=_with_argument_objects(messages), tools=tools, enable_thinking=enable_thinking
            ).prompt
        except (ValueError, TypeError, jinja2.TemplateError) as e:  # raise_exception() in a template is a ValueError
            raise PromptRejected(f"the model's chat template refused these messages: {e}") from e
        if add_generation_prompt and not enable_thinking and prompt.rstrip().endswith(THINK_OPEN):
            # A template that opens the reasoning whatever it is told (as llama.cpp's server
            # also does for such templates): closed, so that reasoning off is off.
            prompt += THINK_CLOSE
        return prompt


def _with_argument_objects(messages: list[dict]) -> list[dict]:
    """The messages with each tool call's arguments as an object: OpenAI sends them as JSON
    text, while chat templates read them as a mapping (Hugging Face's convention; Nemotron's
    iterates ``arguments|items``)."""
    return [
        {**m, "tool_calls": [_call_with_argument_object(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in messages
    ]


def _call_with_argument_object(call: dict) -> dict:
    function = call["function"]
    arguments = function["arguments"]
    if isinstance(arguments, str):
        arguments = _json_or_text(arguments)
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**function, "arguments": arguments}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


# A closing tag the model left out ends at what follows (the call's end, the next parameter).
_XML_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|\Z)", re.S)
_XML_PARAMETER = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|\Z)", re.S)


def parse_tool_call(body: str, tools: list[dict] | None = None) -> ToolCall | None:
    """One call between ``<tool_call>`` tags: JSON ``{"name", "arguments"}`` or the
    ``<function=NAME><parameter=P>value</parameter></function>`` form; None if neither.
    The second form's values are bare text, read as the ``tools``' schemas declare them."""
    body = body.strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        arguments = obj.get("arguments", {})
        return ToolCall(obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))
    match = _XML_FUNCTION.search(body)
    if match is None:
        return None
    name = match.group(1)
    text = _text_parameters(tools, name)
    parameters = {
        p: value if p in text else _json_or_text(value) for p, value in _XML_PARAMETER.findall(match.group(2))
    }
    return ToolCall(name, json.dumps(parameters))


def _text_parameters(tools: list[dict] | None, name: str) -> set[str]:
    """The parameters of the tool called ``name`` whose schema allows text: their values
    stay text (``12345`` stays ``"12345"``)."""
    for tool in tools or ():
        function = tool.get("function") or {}
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return {p for p, schema in properties.items() if isinstance(schema, dict) and allows_text(schema)}
    return set()


def allows_text(schema: dict) -> bool:
    """``"string"`` among the schema's types or its alternatives' (``Optional[str]``), or
    an ``enum`` / ``const`` of strings only."""
    kinds = schema.get("type")
    if kinds == "string" or (isinstance(kinds, list) and "string" in kinds):
        return True
    alternatives = [*(schema.get("anyOf") or ()), *(schema.get("oneOf") or ())]
    if any(isinstance(a, dict) and allows_text(a) for a in alternatives):
        return True
    values = schema["enum"] if isinstance(schema.get("enum"), list) else [schema["const"]] if "const" in schema else []
    return bool(values) and all(isinstance(v, str) for v in values)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass
class OutputPiece:
    content: str = ""
    reasoning: str = ""


class OutputSplitter:
    """Streams generated text into content and reasoning, and collects tool calls.

    Text inside ``<think>`` goes to reasoning and text inside ``<tool_call>`` is held until
    the call is complete, so a voice pipeline never speaks either. A tag split across
    pushes is held back until it is decided.
    """

    def __init__(
        self,
        *,
        in_reasoning: bool = False,
        tools: list[dict] | None = None,
        verbatim: bool = False,
        reasoning: bool = False,
    ):
        """``in_reasoning``: the prompt itself opened a ``<think>`` block; ``tools``: the
        request's, whose schemas type the calls' parameters (a call of any other, or of
        any tool when it has none, is dropped); ``verbatim``: the answer is all
        content (JSON held to a grammar, where a tag is only text inside a string), from
        the start or, with ``reasoning`` on, from the end of the reasoning."""
        self._tools = tools
        self._verbatim = verbatim
        self._verbatim_now = verbatim and not reasoning and not in_reasoning
        self._pending = ""
        self._mode = "reasoning" if in_reasoning else "content"
        self._trim = False
        """Drop the whitespace a model writes between its reasoning and its answer."""
        self._call_body = ""
        self._tool_names = {(tool.get("function") or {}).get("name") for tool in tools or ()}
        self.tool_calls: list[ToolCall] = []
        self.dropped_calls: list[str] = []
        """Calls not passed on: malformed, or of a tool the request does not offer."""

    @property
    def withheld(self) -> bool:
        """Some output went to neither the text nor a call: a call dropped, or cut off."""
        return bool(self.dropped_calls) or self._mode == "tool"

    @property
    def in_reasoning(self) -> bool:
        """The text so far leaves a reasoning block open."""
        return self._mode == "reasoning"

    def push(self, text: str) -> OutputPiece:
        self._pending += text
        out = OutputPiece()
        while self._pending:
            if self._verbatim_now:
                self._emit(out, self._pending)
                self._pending = ""
                break
            close = {"content": None, "reasoning": THINK_CLOSE, "tool": TOOL_CALL_CLOSE}[self._mode]
            tags = [THINK_OPEN, TOOL_CALL_OPEN] if close is None else [close]
            found = [(self._pending.find(t), t) for t in tags if t in self._pending]
            if found:
                at, tag = min(found)
                self._emit(out, self._pending[:at])
                self._pending = self._pending[at + len(tag) :]
                self._switch(tag)
                continue
            keep = _partial_tag_suffix(self._pending, tags)
            self._emit(out, self._pending[: len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep :]
            break
        return out

    def finish(self) -> OutputPiece:
        """Whatever is left once generation ends (an unclosed tool call is malformed)."""
        out = OutputPiece()
        self._emit(out, self._pending)
        self._pending = ""
        if self._mode == "tool" and self._call_body.strip():
            self._close_call()
        return out

    def _emit(self, out: OutputPiece, text: str) -> None:
        if self._mode == "content":
            if self._trim:
                text = text.lstrip()
                self._trim = not text
            out.content += text
        elif self._mode == "reasoning":
            out.reasoning += text
        else:
            self._call_body += text

    def _switch(self, tag: str) -> None:
        if tag == THINK_OPEN:
            self._mode = "reasoning"
        elif tag == TOOL_CALL_OPEN:
            self._mode, self._call_body = "tool", ""
        else:
            if tag == TOOL_CALL_CLOSE:
                self._close_call()
            else:
                self._verbatim_now, self._trim = self._verbatim, True
            self._mode = "content"

    def _close_call(self) -> None:
        call = parse_tool_call(self._call_body, self._tools)
        # A model may call a tool it saw earlier in the conversation, or none was offered
        # (tool_choice "none"): a client cannot run it.
        if call is not None and call.name in self._tool_names:
            self.tool_calls.append(call)
        else:
            why = "is malformed" if call is None else f"calls {call.name!r}, a tool the request does not offer"
            logger.warning(f"The model's tool call {why}; it was dropped: {self._call_body!r}")
            self.dropped_calls.append(self._call_body)
        self._call_body = ""


class StopMatcher:
    """Ends the output before the first of a request's stop sequences (OpenAI's ``stop``).

    Text that could be the start of one is held back until it is decided, so no part of
    a stop sequence is ever streamed.
    """

    def __init__(self, stops: tuple[str, ...]):
        self._stops = list(stops)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """What of ``text`` (and of what was held) can be passed on."""
        if self.stopped:
            return ""
        self._held += text
        found = [self._held.find(stop) for stop in self._stops if stop in self._held]
        if found:
            out, self._held, self.stopped = self._held[: min(found)], "", True
            return out
        keep = _partial_tag_suffix(self._held, self._stops)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out

    def flush(self) -> str:
        """What was held back, once the output ends without a stop sequence."""
        out, self._held = self._held, ""
        return out


def _partial_tag_suffix(text: str, tags: list[str]) -> int:
    """Length of the longest end of ``text`` that could be the start of one of ``tags``."""
    longest = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:n]):
                longest = n
                break
    return longest
