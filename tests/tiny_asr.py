"""A tiny random cache-aware FastConformer RNNT (BPE), saved as .nemo like a real checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from servers.asr.random_model import build_random_streaming_rnnt, calibrate_blank_bias, train_sentencepiece

_WORDS = (
    "the birch canoe slid on smooth planks glue sheet to dark blue background it is easy tell depth of "
    "well these days chicken leg rare dish rice often served in round bowls juice lemons makes fine "
    "punch box was thrown beside parked truck hogs were fed chopped corn and garbage four hours steady "
    "work faced us large size stockings hard sell"
).split()

TINY_SHAPE = {
    "encoder": {"n_layers": 2, "d_model": 64, "n_heads": 4, "subsampling_conv_channels": 32},
    "decoder": {"pred_hidden": 64, "pred_rnn_layers": 1},
    "joint": {"joint_hidden": 64},
}


def build_tiny_asr_checkpoint(directory: Path, speech: torch.Tensor, seed: int = 0) -> Path:
    """Train a 96-piece tokenizer, build the model, make it emit on ~10% of speech frames
    (silence then gives no text), and save it as ``tiny_asr.nemo`` in ``directory``."""
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(8)) for _ in range(400)]
    tokenizer_dir = train_sentencepiece(directory / "tokenizer", corpus, vocab_size=96)
    model = build_random_streaming_rnnt(TINY_SHAPE, tokenizer_dir=tokenizer_dir, seed=seed)
    model.encoder.set_default_att_context_size([70, 1])
    calibrate_blank_bias(model, speech, emit_fraction=0.1)
    path = directory / "tiny_asr.nemo"
    model.save_to(str(path))
    return path
