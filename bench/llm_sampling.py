"""CPU time the LLM engine spends choosing each token, by kind of request, on a random
GGUF with a real model's vocabulary size.

Sampling runs on the CPU however the model runs, once per token, over the whole
vocabulary: on a GPU that decodes a token in a few milliseconds, a sampler that takes as
long halves the speed. The samplers are the engine's own (``LLMEngine._sampler``), next to
what they replaced: llama.cpp's greedy sampler, top_p over the whole vocabulary (no
top_k), and a grammar that judges every token of the vocabulary at every step. The greedy
samplers before and after, and those with and without the check-first grammar, must
choose the same tokens; the benchmark says if they do not.

Random weights: the chain's pick is mostly refused by a schema with fixed keys, which
makes that row the grammar's worst case; inside a JSON string almost every pick is
allowed, as it is for a model that follows the format.

    python -m bench.llm_sampling --vocab 131072 --tokens 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from servers.llm.engine import ChatRequest, LLMEngine
from servers.llm.model import GgufSource, load_llama
from servers.llm.random_model import padding_pieces, write_random_llama_gguf
from servers.llm.sampling import Sampling, sampler_chain
from servers.llm.structured import Grammar, grammar_sampler, response_grammar

PROMPT = [{"role": "user", "content": "hello world"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}, "rain": {"type": "boolean"}, "days": {"type": "integer"}},
    "required": ["city", "rain", "days"],
}


def write_model(path: Path, vocab: int) -> Path:
    return write_random_llama_gguf(path, extra_pieces=padding_pieces(vocab))


def _json_schema(schema: dict) -> str:
    grammar = response_grammar({"type": "json_schema", "json_schema": {"schema": schema}})
    assert grammar is not None
    return grammar


def whole_vocabulary_grammar(llm, grammar: str):
    """The grammar first in a greedy chain: it judges every token at every step."""
    from llama_cpp import llama_sampler_chain_add
    from llama_cpp._internals import LlamaSampler

    chain = LlamaSampler()
    llama_sampler_chain_add(chain.sampler, grammar_sampler(llm._model.vocab, grammar))
    chain.add_greedy()
    return chain


class WithLogprobs:
    """A sampler that also works out each chosen token's log probability and ``top``
    alternatives', as the engine does for a request that asks for ``logprobs``."""

    def __init__(self, engine: LLMEngine, sampler, top: int):
        self._engine = engine
        self._sampler = sampler
        self._top = top

    def sample(self, ctx, idx: int) -> int:
        token = self._sampler.sample(ctx, idx)
        self._engine._token_logprob(token, self._top)
        return token


def cases(llm) -> list[tuple[str, object]]:
    """(name, sampler) pairs, each sampler fresh."""
    engine = {k: LLMEngine(llm, top_k=k) for k in (0, 40)}
    chain_settings = {"n_vocab": llm.n_vocab(), "default_top_k": 40, "window": llm.n_ctx()}
    sampled = Sampling(temperature=0.8, top_p=0.95, seed=1)
    penalized = {"presence_penalty": 0.5, "frequency_penalty": 0.5}
    string_answer = _json_schema({"type": "string"})
    return [
        ("greedy, llama.cpp's greedy sampler (before)", sampler_chain(Sampling(), **chain_settings)),
        ("greedy", engine[40]._sampler(ChatRequest(PROMPT))),
        (
            "greedy, log probabilities with 5 alternatives",
            WithLogprobs(engine[40], engine[40]._sampler(ChatRequest(PROMPT)), 5),
        ),
        ("top_p 0.95, T 0.8, no top_k (before)", engine[0]._sampler(ChatRequest(PROMPT, sampling=sampled))),
        ("top_p 0.95, T 0.8, top_k 40", engine[40]._sampler(ChatRequest(PROMPT, sampling=sampled))),
        (
            "greedy, presence and frequency penalties",
            engine[40]._sampler(ChatRequest(PROMPT, sampling=Sampling(**penalized))),
        ),
        (
            "top_p 0.95, T 0.8, top_k 40, penalties",
            engine[40]._sampler(ChatRequest(PROMPT, sampling=replace(sampled, **penalized))),
        ),
        ("JSON string, grammar on every token (before)", whole_vocabulary_grammar(llm, string_answer)),
        (
            "JSON string, grammar checks the pick",
            engine[40]._sampler(ChatRequest(PROMPT, grammar=Grammar(llm._model.vocab, string_answer))),
        ),
        ("fixed-key schema, grammar on every token (before)", whole_vocabulary_grammar(llm, _json_schema(WEATHER))),
        (
            "fixed-key schema, grammar checks the pick",
            engine[40]._sampler(ChatRequest(PROMPT, grammar=Grammar(llm._model.vocab, _json_schema(WEATHER)))),
        ),
    ]


def sample_times(llm, sampler, tokens: int) -> tuple[list[float], list[int]]:
    """Seconds per ``sample`` call and the tokens chosen, up to ``tokens`` or the end of turn."""
    from llama_cpp import llama_vocab_is_eog

    llm.reset()
    llm.eval(llm.tokenize(b"<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n", special=True))
    times, chosen = [], []
    for _ in range(tokens):
        started = time.perf_counter()
        token = sampler.sample(llm._ctx, -1)
        times.append(time.perf_counter() - started)
        chosen.append(token)
        if llama_vocab_is_eog(llm._model.vocab, token):
            break
        llm.eval([token])
    return times, chosen


def run(model: Path, tokens: int) -> dict:
    llm = load_llama(GgufSource(path=str(model)), context_size=2048, gpu_layers=0, threads=1)
    rows = {}
    chosen = {}
    for name, sampler in cases(llm):
        times, chosen[name] = sample_times(llm, sampler, tokens)
        ms = sorted(t * 1e3 for t in times)
        rows[name] = {"tokens": len(ms), "p50_ms": ms[len(ms) // 2], "p90_ms": ms[int(len(ms) * 0.9)]}
    same = {
        kind: chosen[f"{kind}, grammar on every token (before)"] == chosen[f"{kind}, grammar checks the pick"]
        for kind in ("JSON string", "fixed-key schema")
    }
    same["greedy"] = chosen["greedy, llama.cpp's greedy sampler (before)"] == chosen["greedy"]
    return {"vocab": llm.n_vocab(), "rows": rows, "same_tokens": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=131072, help="vocabulary size (Nemotron 3 Nano: 131072)")
    p.add_argument("--tokens", type=int, default=200, help="tokens per case at most")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(write_model(Path(tmp) / "random.gguf", a.vocab), a.tokens)
    print(f"vocabulary {result['vocab']} tokens; ms per token (p50 / p90)")
    for name, row in result["rows"].items():
        print(f"  {name:52s} {row['p50_ms']:7.2f} / {row['p90_ms']:7.2f}  ({row['tokens']} tokens)")
    for kind, same in result["same_tokens"].items():
        print(f"  {kind}: the new sampler chose {'the same' if same else 'DIFFERENT'} tokens as the one before")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
