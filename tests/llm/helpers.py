"""Building LLM engines on the tiny GGUF and driving them synchronously."""

from __future__ import annotations

from servers.llm.engine import ChatRequest, LlmDelta, LLMEngine, LlmFinished
from servers.llm.model import GgufSource, load_llama

SYSTEM = {"role": "system", "content": "You are ok."}


def make_llm(path, context_size: int = 1024):
    return load_llama(GgufSource(path=str(path)), context_size=context_size, gpu_layers=0, threads=1)


def make_engine(path, **kwargs) -> LLMEngine:
    return LLMEngine(make_llm(path, kwargs.pop("context_size", 1024)), **kwargs)


def run(engine: LLMEngine, request: ChatRequest) -> tuple[str, LlmFinished]:
    """The content and the end of one request, stepping until it is done."""
    events: list = []
    engine.submit(request, events.append)
    engine.run_until_idle()
    content = "".join(e.content for e in events if isinstance(e, LlmDelta))
    return content, events[-1]


def evaluated_tokens(llm) -> int:
    """Tokens llama.cpp has evaluated in this context (its own performance counters)."""
    import llama_cpp

    llama_cpp.llama_synchronize(llm.ctx)
    counters = llama_cpp.llama_perf_context(llm.ctx)
    return counters.n_p_eval + counters.n_eval
