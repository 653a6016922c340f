"""Structured output: OpenAI's ``response_format`` as a llama.cpp grammar.

The grammar masks every token that would leave the JSON asked for, so the answer has the
shape whatever the model's weights. The schema is converted (by llama-cpp-python's port of
llama.cpp's converter) when the request arrives, so one it cannot express is refused then.
"""

from __future__ import annotations

import json
import re
from typing import Any

_LIBRARY_STRING_CHAR = r'[^"\\] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_JSON_STRING_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_STRING_CHAR_RULE = re.compile(rf"^(\S+) ::= {re.escape(_LIBRARY_STRING_CHAR)}$", re.MULTILINE)


class GrammarRejected(ValueError):
    """llama.cpp could not build a sampler from the grammar."""


def response_grammar(response_format: dict[str, Any]) -> str | None:
    """The GBNF grammar that holds the answer to ``response_format`` (None for plain text);
    ValueError, with the reason, for a format that cannot be had."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError('json_schema must be an object: {"name": ..., "schema": {...}}')
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise ValueError("json_schema.schema must be a JSON Schema object")
    else:
        raise ValueError(f'type must be "text", "json_object" or "json_schema", not {kind!r}')
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 - the converter reports what it cannot express in many ways
        raise ValueError(f"the schema cannot be turned into a grammar ({type(e).__name__}: {e})") from e
    # The library's strings admit raw control characters, which JSON (and json.loads) refuse.
    return _STRING_CHAR_RULE.sub(lambda m: f"{m.group(1)} ::= {_JSON_STRING_CHAR}", grammar)


def add_grammar(sampler, vocab, grammar: str) -> None:
    """Put ``grammar`` first in ``sampler`` (a ``LlamaSampler`` chain), so that every later
    sampler chooses among the tokens it allows."""
    from llama_cpp import llama_sampler_chain_add, llama_sampler_init_grammar

    constrained = llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not constrained:
        raise GrammarRejected("llama.cpp could not parse the grammar made from the response format")
    llama_sampler_chain_add(sampler.sampler, constrained)
