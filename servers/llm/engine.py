"""A llama.cpp chat model driven in small units of work, for a scheduler to interleave.

One conversation runs at a time (a local voice agent has one user; more requests queue).
``step()`` is one unit: a slice of the prompt's prefill and, once it is in, a segment of
tokens — a short first segment, so the TTS can start speaking, then longer ones. The
KV cache carries over between units and between turns: a turn whose messages extend the
previous turn's (what a voice pipeline sends) reuses the cached tokens as they were
generated and evaluates only what is new. Hybrid (Mamba) models cannot roll their state
back, so keeping the cached history append-only is what makes the reuse work for them.
"""

from __future__ import annotations

import codecs
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from servers.common.engine import WorkSignal
from servers.llm.chat import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ChatTemplate,
    OutputSplitter,
    PromptRejected,
    StopMatcher,
    ToolCall,
)
from servers.llm.logprobs import TokenLogprob, token_logprob
from servers.llm.sampling import Sampling, logits_at, sampler_chain, token_sampler
from servers.llm.state import StateSnapshot, can_roll_back, restore_snapshot, take_snapshot
from servers.llm.structured import ConstrainedSampler, Grammar
from servers.llm.tool_grammar import tool_call_form


class ContextOverflow(ValueError):
    """The prompt does not leave room for an answer in the model's context."""


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    tools: list[dict] | None = None
    max_tokens: int | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    """The answer ends before the first of these (OpenAI's stop sequences)."""
    parallel_tool_calls: bool = True
    """False: the answer ends with its first tool call."""
    enable_thinking: bool = False
    max_thinking_tokens: int | None = None
    """The reasoning closes after about this many tokens (None: the engine's default)."""
    grammar: Grammar | None = None
    """What the answer must match (structured output, a forced tool call); one request's,
    it keeps its state."""
    top_logprobs: int | None = None
    """None: no log probabilities; else each generated token's, with this many likeliest
    alternatives (reasoning and tool-call tokens included; the end-of-turn token not)."""


@dataclass(frozen=True)
class PreparedRequest:
    """A request rendered and tokenized, ready to queue (``LLMEngine.prepare``)."""

    request: ChatRequest
    prompt_text: str
    prompt: list[int]
    sampler: object


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    """Prompt tokens found in the KV cache, not evaluated again."""
    completion_tokens: int


@dataclass(frozen=True)
class LlmDelta:
    content: str = ""
    reasoning: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    """The tokens generated since the last delta (their text may have been held back
    until now, or be in a later delta)."""


@dataclass(frozen=True)
class LlmFinished:
    finish_reason: str
    """stop, length, tool_calls, cancelled or error."""
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()
    error: str | None = None


LlmEvent = LlmDelta | LlmFinished
Sink = Callable[[LlmEvent], None]


@dataclass(frozen=True)
class LlmStepStats:
    first: bool
    """The unit produced (or was on its way to) the request's first segment."""
    prompt_tokens: int
    """Prompt tokens evaluated in this unit."""
    tokens: int
    """Tokens generated in this unit."""
    seconds: float
    queue_wait_s: float | None
    """For a request's first unit: seconds since it was submitted."""


@dataclass(frozen=True)
class LlmQueueState:
    first_pending: bool
    """A request waits for its first segment of text."""
    generating: bool


@dataclass
class _Generation:
    rid: int
    request: ChatRequest
    sink: Sink
    prompt: list[int]
    """The whole prompt tokenized; once started, the tokens actually fed to the model."""
    prompt_text: str
    submitted: float
    todo: list[int] = field(default_factory=list)
    """Prompt tokens still to evaluate."""
    cached: int = 0
    user_turn_end: int | None = None
    """Where the prompt's messages end and the generation prompt begins, if they split there."""
    snapshot_at: int | None = None
    """Prompt length at which to snapshot the state (models that cannot roll back)."""
    started: bool = False
    tokens: list[int] = field(default_factory=list)
    sampler: object = None
    splitter: OutputSplitter | None = None
    stop: StopMatcher | None = None
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    content: str = ""
    cancelled: bool = False
    reasoning_limit: int | None = None
    reasoning_tokens: int = 0
    """Tokens generated inside the reasoning."""
    at_line_end: bool = False
    """The last token's text ended a line."""
    forced: list[int] = field(default_factory=list)
    """Tokens to say next instead of sampling (the close of a reasoning over its limit)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Log probabilities of tokens not yet sent (if the request asks for them)."""


@dataclass(frozen=True)
class _Resume:
    """A point in the cached tokens a later request can continue from: the tokens that
    render ``messages``, the last one's end included when ``through_reply`` (the reply
    ends with the end-of-turn token), else to the end of their rendering."""

    messages: list[dict]
    tokens: list[int]
    through_reply: bool


@dataclass
class _Conversation:
    """What the KV cache holds: where a request can continue it, latest first (the reply
    as generated; else the end of the user turn before it, for a reply the client cut)."""

    tools: list[dict] | None
    enable_thinking: bool
    resumes: list[_Resume]


class LLMEngine(WorkSignal):
    def __init__(
        self,
        llm,
        *,
        first_segment_tokens: int = 8,
        segment_tokens: int = 16,
        prefill_tokens_per_unit: int = 512,
        default_max_tokens: int = 1024,
        default_max_thinking_tokens: int | None = None,
        max_queued: int = 16,
        top_k: int = 40,
        roll_back: bool | None = None,
    ):
        """``llm`` is a loaded ``llama_cpp.Llama``; every call into it happens in ``step()``.

        ``top_k``: when sampling (temperature above 0), only the k likeliest tokens are
        candidates (0: all), as llama.cpp's own server does by default; a request may
        ask for another k.

        ``default_max_thinking_tokens``: a request's reasoning closes after about this many
        tokens unless it sets its own limit (None: no limit); see ``_reasoning_over``.

        ``roll_back``: whether the model's cached state can be cut back to a common prefix
        (None: ask llama.cpp; transformers can, hybrid and recurrent models cannot and get
        a state snapshot at each user turn instead).
        """
        self._llm = llm
        self._roll_back = can_roll_back(llm) if roll_back is None else roll_back
        self._snapshot: StateSnapshot | None = None
        self.first_segment_tokens = first_segment_tokens
        self.segment_tokens = segment_tokens
        self.prefill_tokens_per_unit = prefill_tokens_per_unit
        self.default_max_tokens = default_max_tokens
        self.default_max_thinking_tokens = default_max_thinking_tokens
        self.max_queued = max_queued
        self.top_k = top_k
        self.template = chat_template(llm)
        self.tool_call_form = tool_call_form(llm.metadata["tokenizer.chat_template"])
        think_close = self._tokenize(THINK_CLOSE)
        self.reasoning_end = (think_close[0], THINK_CLOSE) if len(think_close) == 1 else None
        """The token that ends the model's reasoning, and its text, where ``</think>`` is one
        token: a grammar for the answer waits for it."""
        self._tag_tokens = frozenset(
            tokens[0]
            for tag in (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
            if len(tokens := self._tokenize(tag)) == 1
        )
        """The tags the output is split at, where they are single tokens: their text is kept
        even where the GGUF types them CONTROL (Nemotron-3-Nano's reasoning tags), which
        llama.cpp otherwise renders as nothing."""
        self._end_of_turn = end_of_turn_token(llm, self.template)
        self._end_of_turn_text = llm._model.token_get_text(self._end_of_turn)
        super().__init__()
        self._queue: deque[_Generation] = deque()
        self._active: _Generation | None = None
        self._conversation: _Conversation | None = None
        self._next_rid = 0

    @property
    def vocab(self):
        """The model's ``llama_vocab_p`` (read-only: safe from any thread), for grammars."""
        return self._llm._model.vocab

    @property
    def context_size(self) -> int:
        """The tokens a prompt and its answer may fill: the context asked for. llama.cpp
        pads its context up (300 asked gives 512), but llama-cpp-python keeps the tokens
        it evaluated in a buffer of the size asked, and fails past it."""
        return min(self._llm.n_ctx(), len(self._llm.input_ids))

    # ------------------------------------------------------------------ requests (any thread)

    def prepare(self, request: ChatRequest) -> PreparedRequest:
        """Render and tokenize a request, without the engine's lock: megabytes of text take
        seconds, which must hold up neither the stepping thread nor a server's event loop.
        Raises ``ContextOverflow``, ``PromptRejected`` or ``SamplingRejected``."""
        prompt_text = self.template.render(
            request.messages, tools=request.tools, enable_thinking=request.enable_thinking
        )
        sampler = self._sampler(request)
        prompt = self._tokenize(prompt_text)
        if len(prompt) >= self.context_size:
            raise ContextOverflow(f"the prompt has {len(prompt)} tokens; the context holds {self.context_size}")
        return PreparedRequest(request, prompt_text, prompt, sampler)

    def submit(self, request: ChatRequest | PreparedRequest, sink: Sink) -> int:
        """Queue a chat completion (prepared here if it is not yet); ``sink`` gets its deltas
        and then one ``LlmFinished``. Raises ``OverflowError`` when too many wait."""
        prepared = request if isinstance(request, PreparedRequest) else self.prepare(request)
        request, prompt_text = prepared.request, prepared.prompt_text
        with self._work:
            if self._waiting_with_one_more_locked() > self.max_queued:
                raise OverflowError(f"{self.max_queued} requests are already waiting")
            rid = self._next_rid
            self._next_rid += 1
            generation = _Generation(
                rid, request, sink, prepared.prompt, prompt_text, time.monotonic(), sampler=prepared.sampler
            )
            generation.stop = StopMatcher(request.stop)
            generation.reasoning_limit = (
                self.default_max_thinking_tokens if request.max_thinking_tokens is None else request.max_thinking_tokens
            )
            generation.splitter = OutputSplitter(
                in_reasoning=prompt_text.rstrip().endswith("<think>"),
                tools=request.tools,
                verbatim=request.grammar is not None and not request.grammar.tool_calls,
                reasoning=request.enable_thinking,
            )
            self._queue.append(generation)
            self._signal_work()
        return rid

    def cancel(self, rid: int) -> None:
        """Stop a request now: a queued one never starts, a running one stops at its next token."""
        self._cancel(lambda generation: generation.rid == rid)

    def cancel_all(self) -> None:
        """Stop every request (shutting down): each ends ``cancelled`` at the next step."""
        self._cancel(lambda generation: True)

    def _cancel(self, which: Callable[[_Generation], bool]) -> None:
        """A waiting request leaves the queue at once (a client that is gone keeps no place
        in it); the running one stops at its next token."""
        with self._lock:
            unstarted = [generation for generation in self._queue if which(generation)]
            self._queue = deque(generation for generation in self._queue if not which(generation))
            if self._active is not None and which(self._active):
                self._active.cancelled = True
        for generation in unstarted:
            self._finish_unstarted(generation)

    # ------------------------------------------------------------------ stepping (one thread)

    def _waiting_with_one_more_locked(self) -> int:
        """Requests that would wait for the running one with a new one added (with none
        running, the next to run does not wait)."""
        waiting = len(self._queue) + 1
        return waiting if self._active is not None else waiting - 1

    def _has_work_locked(self) -> bool:
        return self._active is not None or bool(self._queue)

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._queue) + (self._active is not None)

    def queue_state(self) -> LlmQueueState:
        with self._lock:
            # A cancelled answer ends at its next unit: the request behind it is what waits.
            active = self._active if self._active is not None and not self._active.cancelled else None
            first = (active is not None and not active.tokens) or (active is None and bool(self._queue))
            return LlmQueueState(first_pending=first, generating=self._active is not None or bool(self._queue))

    def step(self, budget_s: float | None = None) -> LlmStepStats | None:
        """One unit of work for the current request (None if there was nothing to do).

        ``budget_s``: generate only as many of the segment's tokens as fit in this long (at
        least one), judged by the unit's own tokens so far; a scheduler fills a gap with it.
        """
        started = time.perf_counter()
        with self._lock:
            if self._active is None:
                if not self._queue:
                    return None
                self._active = self._queue.popleft()
            generation = self._active
        waited = None
        first = not generation.tokens
        evaluated = 0
        produced = 0
        try:
            if not generation.started:
                waited = time.monotonic() - generation.submitted
                self._begin(generation)
            if generation.cancelled:
                self._finish(generation, "cancelled")
            elif generation.todo:
                evaluated = self._prefill(generation)
            if self._active is generation and not generation.todo:
                count = self.first_segment_tokens if first else self.segment_tokens
                deadline = None if budget_s is None else started + budget_s
                produced = self._generate(generation, count, deadline)
        except Exception as e:  # noqa: BLE001 - one failed request must not stop the engine
            logger.exception("LLM step failed")
            self._finish(generation, "error", error=f"{type(e).__name__}: {e}")
        return LlmStepStats(
            first=first,
            prompt_tokens=evaluated,
            tokens=produced,
            seconds=time.perf_counter() - started,
            queue_wait_s=waited,
        )

    # ------------------------------------------------------------------ the work (stepping thread)

    def _prompt_tokens(self, request: ChatRequest, prompt_text: str, whole: list[int]) -> list[int]:
        """The prompt as tokens: where the messages continue the cached conversation, its
        own tokens (replies as generated) plus the rest rendered; else ``whole`` (the
        rendered prompt tokenized). Never at the cost of the answer's room: a cached reply
        can hold reasoning that the template leaves out of the history."""
        conversation = self._conversation
        if (
            conversation is None
            or conversation.tools != request.tools
            or conversation.enable_thinking != request.enable_thinking
        ):
            return whole
        room = self._answer_room(request, len(whole))
        for resume in conversation.resumes:
            tokens = self._continue(resume, request, prompt_text)
            if tokens is not None and len(tokens) + room <= self.context_size:
                return tokens
        return whole

    def _continue(self, resume: _Resume, request: ChatRequest, prompt_text: str) -> list[int] | None:
        """``resume``'s tokens plus the rest of ``prompt_text`` tokenized, if the request's
        messages begin with ``resume``'s."""
        count = len(resume.messages)
        if not _same_messages(request.messages[:count], resume.messages):
            return None
        try:
            before = self.template.render(
                request.messages[:count],
                tools=request.tools,
                enable_thinking=request.enable_thinking,
                add_generation_prompt=False,
            )
        except PromptRejected:  # some templates refuse a conversation that ends with the reply
            return None
        if resume.through_reply:
            end = before.rfind(self._end_of_turn_text)
            if end < 0:
                return None
            before = before[: end + len(self._end_of_turn_text)]
        if not prompt_text.startswith(before):
            return None
        return resume.tokens + self._tokenize(prompt_text[len(before) :])

    def _answer_room(self, request: ChatRequest, prompt_tokens: int) -> int:
        return min(request.max_tokens or self.default_max_tokens, self.context_size - prompt_tokens)

    def _tokenize(self, text: str) -> list[int]:
        # The template writes the special tokens itself.
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _begin(self, generation: _Generation) -> None:
        from llama_cpp import Llama

        llm = self._llm
        generation.prompt = self._prompt_tokens(generation.request, generation.prompt_text, generation.prompt)
        cached = llm._input_ids[: llm.n_tokens].tolist()
        # The last prompt token is always evaluated: sampling needs its logits.
        keep = min(Llama.longest_token_prefix(cached, generation.prompt), len(generation.prompt) - 1)
        if keep < llm.n_tokens:
            keep = self._cut_back_to(keep, generation.prompt)
        generation.cached = keep
        generation.todo = generation.prompt[keep:]
        generation.user_turn_end = self._user_turn_end(generation)
        if not self._roll_back and generation.user_turn_end is not None and generation.user_turn_end > keep:
            generation.snapshot_at = generation.user_turn_end
        generation.started = True

    def _sampler(self, request: ChatRequest):
        n_vocab = self._llm.n_vocab()
        settings = {"n_vocab": n_vocab, "default_top_k": self.top_k, "window": self.context_size}
        if request.grammar is None:
            return token_sampler(request.sampling, **settings)
        return ConstrainedSampler(sampler_chain(request.sampling, **settings), request.grammar, n_vocab)

    def _cut_back_to(self, keep: int, prompt: list[int]) -> int:
        """Make the context hold only ``prompt[:n]`` for the largest ``n <= keep`` it can;
        returns ``n``."""
        llm = self._llm
        if self._roll_back and keep > 0 and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            llm.n_tokens = keep
            return keep
        snapshot = self._snapshot
        if (
            snapshot is not None
            and len(snapshot.tokens) <= keep
            and tuple(prompt[: len(snapshot.tokens)]) == snapshot.tokens
            and restore_snapshot(llm, snapshot)
        ):
            return len(snapshot.tokens)
        llm.reset()
        return 0

    def _user_turn_end(self, generation: _Generation) -> int | None:
        """Where the prompt's last message ends and the generation prompt begins: every
        later request of this conversation begins with the prompt up to there, even one
        whose client cut the reply short."""
        request = generation.request
        before = self.template.render(
            request.messages,
            tools=request.tools,
            enable_thinking=request.enable_thinking,
            add_generation_prompt=False,
        )
        if not generation.prompt_text.startswith(before):
            return None
        suffix = self._tokenize(generation.prompt_text[len(before) :])
        at = len(generation.prompt) - len(suffix)
        return at if generation.prompt[at:] == suffix else None

    def _prefill(self, generation: _Generation) -> int:
        llm = self._llm
        budget = self.prefill_tokens_per_unit
        evaluated = 0
        while generation.todo and evaluated < budget:
            count = budget - evaluated
            if generation.snapshot_at is not None and llm.n_tokens < generation.snapshot_at:
                count = min(count, generation.snapshot_at - llm.n_tokens)
            piece = generation.todo[:count]
            llm.eval(piece)
            generation.todo = generation.todo[len(piece) :]
            evaluated += len(piece)
            if llm.n_tokens == generation.snapshot_at:
                self._snapshot = take_snapshot(llm, replacing=self._snapshot)
        return evaluated

    def _generate(self, generation: _Generation, count: int, deadline: float | None = None) -> int:
        """Up to ``count`` tokens; with a ``deadline`` (``time.perf_counter()``), no token
        that would, at this unit's pace so far, end after it (the first always runs)."""
        from llama_cpp import llama_vocab_is_eog

        llm = self._llm
        budget = self._answer_room(generation.request, len(generation.prompt))
        produced = 0
        started = time.perf_counter()
        for _ in range(count):
            now = time.perf_counter()
            if deadline is not None and produced and now + (now - started) / produced > deadline:
                return produced
            if generation.cancelled:
                self._finish(generation, "cancelled")
                return produced
            if not generation.forced and self._reasoning_over(generation):
                line_open = generation.reasoning_tokens and not generation.at_line_end
                generation.forced = self._tokenize("\n" + THINK_CLOSE if line_open else THINK_CLOSE)
            if generation.forced:
                token = generation.forced.pop(0)
                generation.sampler.accept(token)
            else:
                token = generation.sampler.sample(llm._ctx, -1)
            produced += 1
            generation.tokens.append(token)
            if llama_vocab_is_eog(llm._model.vocab, token):
                self._finish(generation, "stop")
                return produced
            if generation.request.top_logprobs is not None:
                generation.logprobs.append(self._token_logprob(token, generation.request.top_logprobs))
            if generation.splitter.in_reasoning:
                generation.reasoning_tokens += 1
            said = generation.decoder.decode(self._token_text(token))
            generation.at_line_end = said.endswith("\n")
            text = generation.stop.push(said)
            piece = generation.splitter.push(text)
            self._send(generation, piece.content, piece.reasoning)
            if generation.stop.stopped or (
                not generation.request.parallel_tool_calls and generation.splitter.tool_calls
            ):
                self._finish(generation, "stop")
                return produced
            llm.eval([token])
            if len(generation.tokens) >= budget:
                self._finish(generation, "length")
                return produced
        return produced

    def _token_text(self, token: int) -> bytes:
        return token_bytes(self._llm, token, special=token in self._tag_tokens)

    def _token_logprob(self, token: int, top: int) -> TokenLogprob:
        """``token``'s log probability under the logits it was chosen from (before it is
        evaluated), with the ``top`` likeliest tokens'."""
        llm = self._llm
        return token_logprob(logits_at(llm._ctx, -1, llm.n_vocab()), token, top, self._token_text)

    @staticmethod
    def _reasoning_over(generation: _Generation) -> bool:
        """The reasoning has had its tokens: it ends at the next line's end, or once a tenth
        more has gone by (as NIM's thinking budget does: a thought is seldom cut mid-way)."""
        limit = generation.reasoning_limit
        if limit is None or not generation.splitter.in_reasoning:
            return False
        over = generation.reasoning_tokens - limit
        return over >= 0 and (generation.at_line_end or over >= limit // 10)

    def _send(self, generation: _Generation, content: str, reasoning: str, *, last: bool = False) -> None:
        """Text as it is decided, with the log probabilities of the tokens so far (the last
        delta carries any left, text or not)."""
        generation.content += content
        if content or reasoning or (last and generation.logprobs):
            logprobs, generation.logprobs = tuple(generation.logprobs), []
            generation.sink(LlmDelta(content=content, reasoning=reasoning, logprobs=logprobs))

    def _finish(self, generation: _Generation, reason: str, error: str | None = None) -> None:
        held = generation.stop.push(generation.decoder.decode(b"", final=True)) + generation.stop.flush()
        last = generation.splitter.push(held)
        rest = generation.splitter.finish()
        self._send(generation, last.content + rest.content, last.reasoning + rest.reasoning, last=True)
        calls = tuple(generation.splitter.tool_calls)
        if reason == "stop" and calls:
            reason = "tool_calls"
        usage = Usage(len(generation.prompt), generation.cached, len(generation.tokens))
        self._remember(generation, calls, reason)
        with self._lock:
            self._active = None
        generation.sink(LlmFinished(reason, usage, calls, error))

    def _finish_unstarted(self, generation: _Generation) -> None:
        generation.sink(LlmFinished("cancelled", Usage(len(generation.prompt), 0, 0)))

    def _remember(self, generation: _Generation, calls: tuple[ToolCall, ...], reason: str) -> None:
        """Record what the cache now holds, closing the reply the way the template does."""
        if reason == "error":
            self._conversation = None
            self._llm.reset()
            return
        # The reply closes the way the template closes it, whichever end token it stopped on.
        from llama_cpp import llama_vocab_is_eog

        reply_tokens = generation.tokens
        if reply_tokens and llama_vocab_is_eog(self._llm._model.vocab, reply_tokens[-1]):
            reply_tokens = reply_tokens[:-1]
        tokens = [*generation.prompt, *reply_tokens, self._end_of_turn]
        reply: dict = {"role": "assistant", "content": generation.content}
        if calls:
            reply["tool_calls"] = [c.as_openai() for c in calls]
        request = generation.request
        # A reply cut at a stop sequence, or with call text the client never got, is not
        # what the cache holds.
        as_sent = not generation.stop.stopped and not generation.splitter.withheld
        resumes = [_Resume([*request.messages, reply], tokens, through_reply=True)] if as_sent else []
        if generation.user_turn_end is not None:
            resumes.append(
                _Resume(request.messages, generation.prompt[: generation.user_turn_end], through_reply=False)
            )
        self._conversation = _Conversation(request.tools, request.enable_thinking, resumes)


def token_bytes(llm, token: int, *, special: bool = False) -> bytes:
    """The token's text (a CONTROL token's only when ``special``). ``Llama.detokenize``
    reads at most 32 bytes of a token and returns nothing at all for a longer one (llama.cpp
    answers with the size it needs)."""
    import ctypes

    from llama_cpp import llama_token_to_piece

    size = 32
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_token_to_piece(llm._model.vocab, token, buffer, size, 0, special)
        if n >= 0:
            return buffer.raw[:n]
        size = -n


def end_of_turn_token(llm, template: ChatTemplate) -> int:
    """The token the template closes an assistant turn with. It need not be the GGUF's
    eos (``<|im_end|>`` against ``</s>``), and the cached conversation must hold what the
    template renders."""
    from llama_cpp import llama_vocab_is_eog

    try:
        rendered = template.render(
            [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}],
            add_generation_prompt=False,
        )
    except PromptRejected:
        return llm.token_eos()
    after_reply = rendered[rendered.rfind("Hello.") + len("Hello.") :]
    closing = llm.tokenize(after_reply.encode("utf-8"), add_bos=False, special=True)
    return next((t for t in closing if llama_vocab_is_eog(llm._model.vocab, t)), llm.token_eos())


def chat_template(llm) -> ChatTemplate:
    """The GGUF's own chat template."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF has no tokenizer.chat_template")
    eos, bos = llm.token_eos(), llm.token_bos()
    return ChatTemplate(
        template,
        eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
    )


def _normal_message(message: dict) -> tuple:
    """What decides a message's rendering, with id differences ignored, and a reply's
    whitespace (a client may trim or join the text it was streamed; the cache holds the
    reply as generated). Any other message is compared as written: an edit is an edit."""
    content = message.get("content") or ""
    if message.get("role") == "assistant":
        content = " ".join(content.split())
    calls = tuple(
        (c.get("function", {}).get("name"), _normal_arguments(c.get("function", {}).get("arguments")))
        for c in message.get("tool_calls") or ()
    )
    return message.get("role"), content, calls


def _normal_arguments(arguments) -> str:
    import json

    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return json.dumps(arguments, sort_keys=True)


def _same_messages(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(_normal_message(x) == _normal_message(y) for x, y in zip(a, b))
