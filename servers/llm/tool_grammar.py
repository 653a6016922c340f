"""Forced tool calls: OpenAI's ``tool_choice`` ``"required"`` or a named function as a
llama.cpp grammar that admits only ``<tool_call>`` blocks for the request's tools.

The blocks are written the way the model's chat template writes them, so a model trained
on its template is held to what it would write anyway: the ``<function=NAME>`` /
``<parameter=P>`` form (Nemotron 3, Qwen3-Coder) where the template has it, else JSON
``{"name", "arguments"}``. Arguments follow each tool's parameter schema; in the first form
a parameter the schema types as text is bare text without ``<``, the rest JSON.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Literal

from servers.llm.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, allows_text
from servers.llm.structured import check_counts, finished_grammar, gbnf_literal

ToolCallForm = Literal["json", "xml"]


def tool_call_form(chat_template: str) -> ToolCallForm:
    """How the model's chat template writes a tool call."""
    return "xml" if "<function=" in chat_template else "json"


def forced_tool(tools: list[dict] | None, choice: str | dict[str, Any]) -> list[dict]:
    """The tools a forcing ``choice`` makes the answer call (``"required"``: one or more of
    them; a named function, as the request schema checked it: it, once); ValueError for a
    choice that names no tool of the request's."""
    if not tools:
        raise ValueError("tool_choice forces a tool call, but the request has no tools")
    if choice == "required":
        return tools
    name = choice["function"]["name"]
    chosen = [tool for tool in tools if (tool.get("function") or {}).get("name") == name]
    if not chosen:
        raise ValueError(f"tool_choice names {name!r}, which is not among the request's tools")
    return chosen


def tool_call_grammar(tools: list[dict], form: ToolCallForm, *, several: bool) -> str:
    """GBNF for a call of one of ``tools`` (``several``: one or more calls, one after
    another), written in ``form``; ValueError, with the reason, for parameters a grammar
    cannot express."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    calls = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        name = function["name"]
        parameters = copy.deepcopy(function.get("parameters") or {"type": "object", "properties": {}})
        try:
            check_counts(parameters)
            parameters = converter.resolve_refs(parameters, f"tool-{i}")
            body = (_xml_call if form == "xml" else _json_call)(converter, name, parameters, f"tool-{i}")
        except RecursionError as e:
            raise ValueError(f"the parameters of {name!r} are nested too deeply") from e
        except Exception as e:  # noqa: BLE001 - the converter reports what it cannot express in many ways
            raise ValueError(f"the parameters of {name!r} cannot be turned into a grammar ({e})") from e
        calls.append(converter._add_rule(f"call-{i}", body))
    converter._add_rule("call", " | ".join(calls))
    converter._add_rule(
        "root", f"{gbnf_literal(TOOL_CALL_OPEN)} call {gbnf_literal(TOOL_CALL_CLOSE)}" + (" root?" if several else "")
    )
    return finished_grammar(converter.format_grammar())


def _json_call(converter, name: str, parameters: dict, rule: str) -> str:
    arguments = converter.visit(parameters, f"{rule}-arguments")
    return (
        f'"\\n"? "{{" space "\\"name\\"" space ":" space {gbnf_literal(json.dumps(name))} space "," space '
        f'"\\"arguments\\"" space ":" space {arguments} space "}}" "\\n"?'
    )


def _xml_call(converter, name: str, parameters: dict, rule: str) -> str:
    properties = parameters.get("properties") or {}
    required = set(parameters.get("required") or ())
    items = []
    for j, (parameter, schema) in enumerate(properties.items()):
        value = _xml_value(converter, schema if isinstance(schema, dict) else {}, f"{rule}-p{j}")
        item = f'{gbnf_literal(f"<parameter={parameter}>")} "\\n"? {value} "\\n"? "</parameter>" "\\n"?'
        items.append(item if parameter in required else f"({item})?")
    return f'"\\n"? {gbnf_literal(f"<function={name}>")} "\\n"? {" ".join(items)} "</function>" "\\n"?'


def _xml_value(converter, schema: dict, rule: str) -> str:
    """A parameter's value as the tool-call parser reads it: text where the schema allows
    text (of its length, without ``<``, which could begin ``</parameter>``), an enum's
    strings as they are, JSON otherwise."""
    values = schema.get("enum") if isinstance(schema.get("enum"), list) else None
    if values and all(isinstance(v, str) for v in values):
        return "(" + " | ".join(gbnf_literal(v) for v in values) + ")"
    if allows_text(schema):
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        return f"[^<]{{{low},{'' if high is None else high}}}"
    return converter.visit(schema, rule)
