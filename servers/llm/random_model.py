"""Random-weight GGUF models, for tests and benchmarks: the llama architecture, and the
hybrid Mamba-2 + attention + MoE one of Nemotron-3-Nano (``nemotron_h_moe``).

The file is what a real checkpoint looks like to llama.cpp: SentencePiece vocabulary with
ChatML control tokens, a chat template (tools, reasoning switch) in the metadata, and the
weights. Only the values are random, so the production loader and engine run unchanged.
"""

from __future__ import annotations

import argparse
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from servers.llm.chat import THINK_CLOSE, THINK_OPEN

if TYPE_CHECKING:
    import gguf

CHAT_TEMPLATE = r"""{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call functions. Their signatures are inside <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Return each call as <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}
{%- set content = message.content or '' %}
{%- if '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}
<|im_start|>assistant
{{ content }}
{%- if message.tool_calls %}{% for tc in message.tool_calls %}
<tool_call>{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments if tc.function.arguments is string else tc.function.arguments | tojson }}}</tool_call>
{%- endfor %}{% endif %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""

_WORDS = ["user", "assistant", "system", "tool", "hello", "world", "the", "name", "arguments", "weather", "city"]
END_OF_TURN = 4


def vocabulary(extra: tuple[str, ...] = (), *, think_tags: bool = True):
    """(pieces, scores, types) of a small SentencePiece vocabulary with byte fallback, and
    the ``extra`` pieces (``\u2581`` for a space) it lacks last (llama.cpp's grammar
    sampler aborts on a vocabulary that holds a piece twice). ``think_tags``: ``<think>``
    and ``</think>`` are tokens (else text, as for a model that does not reason)."""
    from gguf import TokenType as T

    special = [
        ("<unk>", T.UNKNOWN),
        ("<s>", T.CONTROL),
        ("</s>", T.CONTROL),
        ("<|im_start|>", T.CONTROL),
        ("<|im_end|>", T.CONTROL),
        # Nemotron-3-Nano's GGUF types its reasoning tags CONTROL (llama.cpp then renders
        # them as nothing unless asked), Qwen's types its tool-call tags USER_DEFINED.
        ("<think>", T.CONTROL),
        ("</think>", T.CONTROL),
        ("<tool_call>", T.USER_DEFINED),
        ("</tool_call>", T.USER_DEFINED),
    ]
    special = [(p, t) for p, t in special if think_tags or p not in (THINK_OPEN, THINK_CLOSE)]
    pieces = [p for p, _ in special]
    types = [t for _, t in special]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    normal = ["\u2581", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", *'{}:",.!?_-']
    for word in _WORDS + ["\u2581" + w for w in _WORDS]:
        # SentencePiece merges only into pieces that exist: add every prefix.
        normal += [word[:j] for j in range(2, len(word) + 1) if word[:j] not in normal]
    normal += [piece for piece in extra if piece not in normal and piece not in pieces]
    pieces += normal
    types += [T.NORMAL] * len(normal)
    scores = [0.0] * (len(pieces) - len(normal)) + [-1000.0 + 10 * len(p) - 1e-3 * i for i, p in enumerate(normal)]
    return pieces, scores, types


def write_random_llama_gguf(
    path: str | Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context_length: int = 4096,
    init_std: float = 0.5,
    seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
    eos_token_id: int = END_OF_TURN,
    extra_pieces: tuple[str, ...] = (),
    think_tags: bool = True,
) -> Path:
    """Write a random llama-architecture chat model to ``path`` (f32, a few hundred KiB by
    default); ``extra_pieces`` grow the vocabulary (a real model's size costs in sampling);
    ``think_tags``: see :func:`vocabulary`."""
    vocab = vocabulary(extra_pieces, think_tags=think_tags)
    pieces = vocab[0]
    weight = _random_weights(seed, init_std)
    head_dim = n_embd // n_head
    tensors = {"token_embd.weight": weight(len(pieces), n_embd), "output.weight": weight(len(pieces), n_embd)}
    for i in range(n_layer):
        tensors |= {
            f"blk.{i}.attn_q.weight": weight(n_embd, n_embd),
            f"blk.{i}.attn_k.weight": weight(n_head_kv * head_dim, n_embd),
            f"blk.{i}.attn_v.weight": weight(n_head_kv * head_dim, n_embd),
            f"blk.{i}.attn_output.weight": weight(n_embd, n_embd),
            f"blk.{i}.ffn_gate.weight": weight(n_ff, n_embd),
            f"blk.{i}.ffn_up.weight": weight(n_ff, n_embd),
            f"blk.{i}.ffn_down.weight": weight(n_embd, n_ff),
        }
    return write_llama_gguf(
        path,
        vocab,
        tensors,
        n_head=n_head,
        context_length=context_length,
        chat_template=chat_template,
        eos_token_id=eos_token_id,
    )


def write_llama_gguf(
    path: str | Path,
    vocab: tuple[list, list, list],
    tensors: dict[str, np.ndarray],
    *,
    n_head: int,
    context_length: int = 4096,
    chat_template: str = CHAT_TEMPLATE,
    eos_token_id: int = END_OF_TURN,
) -> Path:
    """A llama-architecture chat model with these weights (the norms' are ones), its shape
    read from them, and the vocabulary from :func:`vocabulary`."""
    n_embd = tensors["token_embd.weight"].shape[1]
    n_layer = len([name for name in tensors if name.endswith(".attn_q.weight")])
    head_dim = n_embd // n_head
    w = _chat_model_writer(path, "llama", vocab, context_length, chat_template, eos_token_id)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(tensors["blk.0.ffn_gate.weight"].shape[0])
    w.add_head_count(n_head)
    w.add_head_count_kv(tensors["blk.0.attn_k.weight"].shape[0] // head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    ones = np.ones(n_embd, np.float32)
    w.add_tensor("token_embd.weight", tensors["token_embd.weight"])
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", tensors["output.weight"])
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{part}.weight", tensors[f"blk.{i}.{part}.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        for part in ("ffn_gate", "ffn_up", "ffn_down"):
            w.add_tensor(f"blk.{i}.{part}.weight", tensors[f"blk.{i}.{part}.weight"])
    return _write(w, path)


@dataclass(frozen=True)
class NemotronHShape:
    """The shape of a ``nemotron_h_moe`` model; the default is a tiny one for tests."""

    layers: str = "MEM*E"
    """The converter's pattern: ``M`` Mamba-2, ``*`` attention, ``E`` routed experts plus a
    shared one."""
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    ssm_heads: int = 4
    ssm_head_dim: int = 32
    ssm_state: int = 16
    ssm_groups: int = 2
    n_expert: int = 4
    n_expert_used: int = 2
    n_ff_exp: int = 32
    n_ff_shexp: int = 64
    n_vocab: int = 0
    """Pad the vocabulary with random word pieces up to this many (0: the small one)."""


NEMOTRON_3_NANO_PROXY = NemotronHShape(
    layers="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    n_embd=2688,
    n_head=32,
    n_head_kv=2,
    head_dim=128,
    ssm_heads=64,
    ssm_head_dim=64,
    ssm_state=128,
    ssm_groups=8,
    n_expert=8,
    n_expert_used=6,
    n_ff_exp=1856,
    n_ff_shexp=3712,
    n_vocab=131072,
)
"""Nemotron-3-Nano-30B-A3B's layers, widths and vocabulary with 8 routed experts instead of
128: the same ~3.2 B parameters a token reads (6 experts, the shared one, Mamba-2 and
attention), in 4 B instead of 32 B. A prefill, whose tokens together reach most of the
real model's experts, reads less of this one."""


def write_random_nemotron_h_gguf(
    path: str | Path,
    shape: NemotronHShape = NemotronHShape(),
    *,
    init_std: float = 0.5,
    seed: int = 0,
    q8_0: bool = False,
) -> Path:
    """Write a random hybrid chat model of Nemotron-3-Nano's architecture (llama.cpp's
    ``nemotron_h_moe``) to ``path``, with the vocabulary and template of
    :func:`write_random_llama_gguf` (f32, under 1 MiB by default). llama.cpp cannot cut a
    recurrent state back, so this model runs the engine's snapshot path on a real hybrid
    memory. ``q8_0``: the matrices are random Q8_0 blocks, as a Q8 checkpoint holds them
    (and drawn as such: a full-size model is written in seconds, not minutes)."""
    import gguf

    if set(shape.layers) - set("M*E"):
        raise ValueError(f"layers {shape.layers!r}: M (Mamba-2), * (attention) or E (experts) each")
    vocab = vocabulary(padding_pieces(shape.n_vocab))
    n_vocab, n_embd = len(vocab[0]), shape.n_embd
    weight = _random_weights(seed, init_std)
    rng = np.random.default_rng(seed + 1)
    d_inner = shape.ssm_heads * shape.ssm_head_dim
    conv_channels = d_inner + 2 * shape.ssm_groups * shape.ssm_state  # x, B and C
    in_proj = d_inner + conv_channels + shape.ssm_heads  # z, x, B, C and the time steps
    w = _chat_model_writer(path, "nemotron_h_moe", vocab, 4096, CHAT_TEMPLATE, END_OF_TURN, q8_0=q8_0)

    def matrix(name: str, *dims: int) -> None:
        if not q8_0:
            w.add_tensor(name, weight(*dims))
            return
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
        blocks = np.empty((*dims[:-1], dims[-1] // block, size), np.uint8)
        # Uniform in ±127 steps of one scale: the standard deviation asked for.
        scale = np.float16(init_std * np.sqrt(3.0) / 127.0)
        blocks[..., :2] = np.frombuffer(scale.tobytes(), np.uint8)
        blocks[..., 2:] = rng.integers(-127, 128, (*dims[:-1], dims[-1] // block, block), np.int8).view(np.uint8)
        w.add_tensor(name, blocks.reshape(*dims[:-1], -1), raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    w.add_embedding_length(n_embd)
    w.add_block_count(len(shape.layers))
    # A layer with neither attention heads nor a feed-forward is a Mamba-2 layer.
    w.add_feed_forward_length([shape.n_ff_exp if kind == "E" else 0 for kind in shape.layers])
    w.add_head_count(shape.n_head)
    w.add_head_count_kv([shape.n_head_kv if kind == "*" else 0 for kind in shape.layers])
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_layer_norm_eps(1e-5)  # unused (RMS norms), but converted models carry it and llama.cpp requires it
    w.add_ssm_conv_kernel(4)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(shape.ssm_state)
    w.add_ssm_time_step_rank(shape.ssm_heads)
    w.add_ssm_group_count(shape.ssm_groups)
    w.add_expert_count(shape.n_expert)
    w.add_expert_used_count(shape.n_expert_used)
    w.add_expert_feed_forward_length(shape.n_ff_exp)
    w.add_expert_shared_count(1)
    w.add_expert_shared_feed_forward_length(shape.n_ff_shexp)
    w.add_expert_weights_norm(True)
    w.add_expert_weights_scale(2.5)
    matrix("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    matrix("output.weight", n_vocab, n_embd)
    for i, kind in enumerate(shape.layers):
        block = f"blk.{i}."
        w.add_tensor(block + "attn_norm.weight", np.ones(n_embd, np.float32))
        if kind == "M":
            matrix(block + "ssm_in.weight", in_proj, n_embd)
            w.add_tensor(block + "ssm_conv1d.weight", weight(conv_channels, 4))
            w.add_tensor(block + "ssm_conv1d.bias", weight(conv_channels))
            w.add_tensor(block + "ssm_dt.bias", weight(shape.ssm_heads))
            w.add_tensor(block + "ssm_a", -np.exp(weight(shape.ssm_heads, 1)))  # A = -exp(A_log), as converted
            w.add_tensor(block + "ssm_d", weight(shape.ssm_heads, 1))
            w.add_tensor(
                block + "ssm_norm.weight", np.ones((shape.ssm_groups, d_inner // shape.ssm_groups), np.float32)
            )
            matrix(block + "ssm_out.weight", n_embd, d_inner)
        elif kind == "*":
            matrix(block + "attn_q.weight", shape.n_head * shape.head_dim, n_embd)
            matrix(block + "attn_k.weight", shape.n_head_kv * shape.head_dim, n_embd)
            matrix(block + "attn_v.weight", shape.n_head_kv * shape.head_dim, n_embd)
            matrix(block + "attn_output.weight", n_embd, shape.n_head * shape.head_dim)
        else:
            w.add_tensor(block + "ffn_gate_inp.weight", weight(shape.n_expert, n_embd))
            w.add_tensor(block + "exp_probs_b.bias", weight(shape.n_expert))
            matrix(block + "ffn_up_exps.weight", shape.n_expert, shape.n_ff_exp, n_embd)
            matrix(block + "ffn_down_exps.weight", shape.n_expert, n_embd, shape.n_ff_exp)
            matrix(block + "ffn_up_shexp.weight", shape.n_ff_shexp, n_embd)
            matrix(block + "ffn_down_shexp.weight", n_embd, shape.n_ff_shexp)
    return _write(w, path)


def padding_pieces(size: int) -> tuple[str, ...]:
    """Random word pieces that grow :func:`vocabulary` to ``size`` (a real model's), for
    its ``extra``; none for a size it already has."""
    base = vocabulary()[0]
    return _random_pieces(max(size - len(base), 0), set(base))


def _random_pieces(count: int, taken: set[str], seed: int = 0) -> tuple[str, ...]:
    """``count`` distinct word pieces not in ``taken``, half of them word starts (a leading
    ``\u2581``)."""
    rng = random.Random(seed)
    pieces: set[str] = set()
    while len(pieces) < count:
        word = "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(2, 9)))
        piece = ("\u2581" if rng.random() < 0.5 else "") + word
        if piece not in taken:
            pieces.add(piece)
    return tuple(sorted(pieces))


def _random_weights(seed: int, init_std: float) -> Callable[..., np.ndarray]:
    """Draws f32 weights of a shape, in the order asked for (the same seed, the same model)."""
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * init_std).astype(np.float32)

    return weight


def _chat_model_writer(
    path: str | Path,
    arch: str,
    vocab: tuple[list, list, list],
    context_length: int,
    chat_template: str,
    eos_token_id: int,
    *,
    q8_0: bool = False,
) -> gguf.GGUFWriter:
    """A ``gguf.GGUFWriter`` for ``arch`` holding what every model here shares: the
    vocabulary from :func:`vocabulary` and the chat template; its file type says f32
    weights, or Q8_0 ones (``q8_0``)."""
    import gguf

    pieces, scores, types = vocab
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"random-{arch}")
    w.add_context_length(context_length)
    w.add_vocab_size(len(pieces))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos_token_id)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(chat_template)
    return w


def _write(w: gguf.GGUFWriter, path: str | Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def main() -> None:
    p = argparse.ArgumentParser(description="Write a random-weight GGUF (tests, benchmarks): llama, or Nemotron-H MoE.")
    p.add_argument("path")
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-head-kv", type=int, default=2)
    p.add_argument("--n-ff", type=int, default=128)
    p.add_argument("--init-std", type=float, default=0.5)
    p.add_argument(
        "--nemotron-h",
        choices=["tiny", "nano-proxy"],
        help="write a hybrid Nemotron-H MoE instead: tiny (tests) or nano-proxy (Nemotron-3-Nano's shape with "
        "8 experts, Q8_0: benchmarks); only --init-std applies",
    )
    a = p.parse_args()
    if a.nemotron_h:
        proxy = a.nemotron_h == "nano-proxy"
        shape = NEMOTRON_3_NANO_PROXY if proxy else NemotronHShape()
        write_random_nemotron_h_gguf(a.path, shape, init_std=a.init_std, q8_0=proxy)
    else:
        write_random_llama_gguf(
            a.path,
            n_embd=a.n_embd,
            n_layer=a.n_layer,
            n_head=a.n_head,
            n_head_kv=a.n_head_kv,
            n_ff=a.n_ff,
            init_std=a.init_std,
        )


if __name__ == "__main__":
    main()
