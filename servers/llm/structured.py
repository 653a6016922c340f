"""Structured output: OpenAI's ``response_format`` as a llama.cpp grammar.

The grammar masks every token that would leave the JSON asked for, so the answer has the
shape whatever the model's weights. The schema is converted (by llama-cpp-python's port of
llama.cpp's converter) and parsed by llama.cpp when the request arrives, so one it cannot
express is refused then. The converter writes every repetition out (a string's
``maxLength`` of n becomes n nested groups) and llama.cpp's parser recurses through the
nesting: a ``maxLength`` of 100000 crashed the process, so counts are bounded first.

``Grammar`` and ``ConstrainedSampler`` hold any answer to a grammar: forced tool calls
(``tool_grammar``) use them too.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import weakref
from typing import Any

from servers.llm.sampling import logits_at

_LIBRARY_STRING_CHAR = r'[^"\\] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_JSON_STRING_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_STRING_CHAR_RULE = re.compile(rf"^(\S+) ::= {re.escape(_LIBRARY_STRING_CHAR)}$", re.MULTILINE)

MAX_REPEAT = 1000
"""Largest length, item or property count, or pattern repetition a schema may ask for."""
MAX_GRAMMAR_CHARS = 256_000
"""Largest grammar made from a schema (llama.cpp parses one this size in about 0.1 s)."""
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")


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
        check_counts(schema)
    except RecursionError as e:
        raise ValueError("the schema is nested too deeply") from e
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 - the converter reports what it cannot express in many ways
        raise ValueError(f"the schema cannot be turned into a grammar ({type(e).__name__}: {e})") from e
    return finished_grammar(grammar)


def finished_grammar(grammar: str) -> str:
    """A grammar from llama-cpp-python's schema converter, bounded in size, with JSON's
    strings; ValueError for one too large to parse."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"the schema's grammar has {len(grammar)} characters; at most {MAX_GRAMMAR_CHARS} are taken")
    # The library's strings admit raw control characters, which JSON (and json.loads) refuse.
    return _STRING_CHAR_RULE.sub(lambda m: f"{m.group(1)} ::= {_JSON_STRING_CHAR}", grammar)


def check_counts(node: Any) -> None:
    """ValueError for a schema that asks for more than ``MAX_REPEAT`` repetitions anywhere
    (RecursionError for one nested past Python's limit)."""
    if isinstance(node, list):
        for item in node:
            check_counts(item)
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        counts = [value] if key in _COUNTS and isinstance(value, int | float) else []
        if key == "pattern" and isinstance(value, str):
            counts = [int(n) for match in _QUANTIFIER.finditer(value) for n in match.groups() if n]
        if any(count > MAX_REPEAT for count in counts):
            raise ValueError(f"{key} asks for more than {MAX_REPEAT} repetitions")
        check_counts(value)


def grammar_sampler(vocab, grammar: str, *, after: tuple[int, str] | None = None):
    """llama.cpp's sampler for ``grammar`` (a ``llama_sampler_p`` the caller frees).

    ``after``: a token and its text (the end of the reasoning) that the grammar waits
    for; what comes before it is free, and the answer after it may begin with a little
    whitespace.
    A token, not a pattern: llama.cpp would match a pattern against all the output so far
    at every token.
    """
    from llama_cpp import llama_sampler_init_grammar, llama_sampler_init_grammar_lazy_patterns, llama_token

    if after is None:
        sampler = llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    else:
        token, text = after
        # Bounded: a model can keep choosing whitespace, which the answer would never end.
        lazy = f"{grammar}\n{_AFTER_ROOT} ::= {gbnf_literal(text)} [ \\t\\n]{{0,4}} root\n"
        triggers = (llama_token * 1)(token)
        sampler = llama_sampler_init_grammar_lazy_patterns(
            vocab, lazy.encode("utf-8"), _AFTER_ROOT.encode(), None, 0, triggers, 1
        )
    if not sampler:
        raise GrammarRejected("llama.cpp could not parse the grammar made for the answer")
    return sampler


_AFTER_ROOT = "answer-after-trigger"


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal (JSON's escapes are GBNF's)."""
    return json.dumps(text)


class Grammar:
    """A grammar parsed by llama.cpp, for one request's answer (it keeps that answer's state)."""

    def __init__(self, vocab, text: str, *, tool_calls: bool = False, after: tuple[int, str] | None = None):
        """``tool_calls``: the grammar admits tool-call blocks (else a JSON answer, where a
        tag is only text); ``after``: see :func:`grammar_sampler`."""
        from llama_cpp import llama_sampler_free

        self.tool_calls = tool_calls
        self.sampler = grammar_sampler(vocab, text, after=after)
        weakref.finalize(self, llama_sampler_free, self.sampler)


class ConstrainedSampler:
    """Samples as ``chain`` does, from the tokens a grammar allows.

    The grammar judges the chain's pick first, and the whole vocabulary only when it
    refuses that one, as llama.cpp's own sampler does: judging all of a 131k vocabulary
    takes tens of milliseconds of CPU a token (more than a GPU takes to decode one), while
    a model that follows the format mostly picks an allowed token anyway.
    """

    def __init__(self, chain, grammar: Grammar, n_vocab: int):
        """``chain``: a ``LlamaSampler``."""
        from llama_cpp._internals import LlamaTokenDataArray

        self._chain = chain
        self._grammar = grammar
        self._n_vocab = n_vocab
        self._all = LlamaTokenDataArray(n_vocab=n_vocab)
        self._one = LlamaTokenDataArray(n_vocab=1)

    def sample(self, ctx, idx: int) -> int:
        """The next token from the logits at ``idx`` of ``ctx`` (a ``LlamaContext``), accepted
        by the grammar and the chain."""
        logits = logits_at(ctx, idx, self._n_vocab)
        token = self._pick(logits, constrained=False)
        if not self._allows(token):
            token = self._pick(logits, constrained=True)
        self.accept(token)
        return token

    def accept(self, token: int) -> None:
        """``token`` comes next, sampled or not: the grammar and the chain's penalties follow it."""
        from llama_cpp import llama_sampler_accept

        llama_sampler_accept(self._grammar.sampler, token)
        llama_sampler_accept(self._chain.sampler, token)

    def _pick(self, logits, *, constrained: bool) -> int:
        from llama_cpp import llama_sampler_apply

        self._all.copy_logits(logits)
        candidates = self._all.candidates
        candidates.selected = -1
        if constrained:
            llama_sampler_apply(self._grammar.sampler, ctypes.byref(candidates))
        llama_sampler_apply(self._chain.sampler, ctypes.byref(candidates))
        chosen = candidates.data[candidates.selected]
        if constrained and chosen.logit == float("-inf"):
            # Accepting it would abort the process inside llama.cpp.
            raise GrammarRejected("no token of the vocabulary can continue the answer in the response format")
        return int(chosen.id)

    def _allows(self, token: int) -> bool:
        from llama_cpp import llama_sampler_apply

        one = self._one
        one.candidates_data.id[0] = token
        one.candidates_data.logit[0] = 0.0
        one.candidates.size = 1
        one.candidates.selected = -1
        llama_sampler_apply(self._grammar.sampler, ctypes.byref(one.candidates))
        return math.isfinite(one.candidates_data.logit[0])
