"""Random-weight cache-aware FastConformer RNNT models of a given shape.

Real checkpoints cannot be downloaded where the tests and some benchmarks run. Timing
depends on shapes, not weight values, and streaming correctness (chunked == offline,
batch rows == each stream alone) holds for any weights, so tests build a tiny model and
benchmarks a full-size one from ``../shared/models/nemotron_streaming_0.6b_shape.yaml``,
both of the real classes, saved as ``.nemo`` and loaded through the production loader.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

# Keys of the shape files (``../shared/models/*.yaml``), with the values used where a
# shape file leaves one out.
_SHAPE_DEFAULTS: dict[str, Any] = {
    "sample_rate": 16000,
    "preprocessor": {
        "features": 128,
        "window_size": 0.025,
        "window_stride": 0.01,
        "n_fft": 512,
        "window": "hann",
        "normalize": "NA",
        "dither": 0.0,
    },
    "encoder": {
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 4,
        "ff_expansion_factor": 2,
        "self_attention_model": "rel_pos",
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": 32,
        "causal_downsampling": True,
        "att_context_size": [[70, 13], [70, 6], [70, 1], [70, 0]],
        "att_context_style": "chunked_limited",
        "conv_kernel_size": 9,
        "conv_norm_type": "layer_norm",
        "conv_context_size": "causal",
        "xscaling": True,
    },
    "decoder": {"pred_hidden": 64, "pred_rnn_layers": 1},
    "joint": {"joint_hidden": 64, "activation": "relu"},
}


def _merged_shape(shape: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _SHAPE_DEFAULTS.items()}
    for key, value in shape.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def load_shape(path: str | Path) -> dict[str, Any]:
    """Read a shape file such as ``nemotron_streaming_0.6b_shape.yaml``."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def train_sentencepiece(directory: str | Path, corpus: Sequence[str], vocab_size: int) -> Path:
    """Train a small SentencePiece BPE tokenizer, stored the way NeMo BPE models expect."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text_file = directory / "corpus.txt"
    text_file.write_text("\n".join(corpus) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        bos_id=-1,
        eos_id=-1,
        minloglevel=2,
    )
    # NeMo's BPE models also register a plain piece list beside the SentencePiece model.
    pieces = [line.split("\t")[0] for line in (directory / "tokenizer.vocab").read_text().splitlines()]
    (directory / "vocab.txt").write_text("\n".join(pieces) + "\n")
    return directory


def _model_config(shape: dict[str, Any], labels: Sequence[str] | None, tokenizer_dir: Path | None):
    pre, enc, dec, joint = shape["preprocessor"], shape["encoder"], shape["decoder"], shape["joint"]
    d_model = enc["d_model"]
    vocabulary = list(labels) if labels is not None else []
    cfg: dict[str, Any] = {
        "sample_rate": shape["sample_rate"],
        "model_defaults": {"enc_hidden": d_model, "pred_hidden": dec["pred_hidden"]},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": shape["sample_rate"],
            "normalize": pre["normalize"],
            "window_size": pre["window_size"],
            "window_stride": pre["window_stride"],
            "window": pre["window"],
            "features": pre["features"],
            "n_fft": pre["n_fft"],
            "log": True,
            "frame_splicing": 1,
            "dither": pre["dither"],
            "pad_to": 0,
            "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": pre["features"],
            "feat_out": -1,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "dropout": 0.0,
            "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0,
            "dropout_att": 0.0,
            **enc,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "vocab_size": len(vocabulary),
            "prednet": {
                "pred_hidden": dec["pred_hidden"],
                "pred_rnn_layers": dec["pred_rnn_layers"],
                "t_max": None,
                "dropout": 0.0,
            },
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None,
            "preserve_memory": False,
            "fuse_loss_wer": False,
            "fused_batch_size": None,
            "num_classes": len(vocabulary),
            "vocabulary": vocabulary,
            "jointnet": {
                "joint_hidden": joint["joint_hidden"],
                "activation": joint["activation"],
                "dropout": 0.0,
            },
        },
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}},
        "loss": {"loss_name": "default"},
        "optim": None,
    }
    if labels is not None:
        cfg["labels"] = vocabulary
    else:
        cfg["tokenizer"] = {"dir": str(tokenizer_dir), "type": "bpe"}
    return OmegaConf.create(cfg)


def build_random_streaming_rnnt(
    shape: Mapping[str, Any],
    *,
    labels: Sequence[str] | None = None,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
):
    """Build a randomly initialised cache-aware streaming RNNT of ``shape``.

    Give ``tokenizer_dir`` (a SentencePiece model, as the released checkpoint has) for an
    ``EncDecRNNTBPEModel``, or ``labels`` for a character ``EncDecRNNTModel``.
    """
    from nemo.collections.asr.models import EncDecRNNTBPEModel, EncDecRNNTModel

    if (labels is None) == (tokenizer_dir is None):
        raise ValueError("give exactly one of labels= or tokenizer_dir=")
    cfg = _model_config(_merged_shape(shape), labels, Path(tokenizer_dir) if tokenizer_dir else None)
    torch.manual_seed(seed)
    model = EncDecRNNTModel(cfg=cfg) if labels is not None else EncDecRNNTBPEModel(cfg=cfg)
    return model.eval()


@torch.no_grad()
def calibrate_blank_bias(model, audio: torch.Tensor, emit_fraction: float) -> float:
    """Shift the blank logit so that about ``emit_fraction`` of ``audio``'s frames emit.

    Random weights put almost the same margin between blank and the best other token on
    every frame, so they emit either on every frame (the maximum symbols each) or never.
    Setting the threshold inside that narrow margin distribution makes the output sparse,
    depend on the audio, and empty on silence, like a trained model's. Returns the shift.
    """
    features, n = model.preprocessor(input_signal=audio[None], length=torch.tensor([audio.shape[0]]))
    encoded, _ = model.encoder(audio_signal=features, length=n)
    start, _, _ = model.decoder(
        targets=torch.zeros(1, 0, dtype=torch.long), target_length=torch.zeros(1, dtype=torch.long)
    )
    logits = model.joint(encoder_outputs=encoded, decoder_outputs=start)[0, :, 0, :]
    blank = model.joint.num_classes_with_blank - 1
    margin = torch.cat([logits[:, :blank], logits[:, blank + 1 :]], dim=1).max(dim=1).values - logits[:, blank]
    shift = torch.quantile(margin, 1.0 - emit_fraction).item()
    model.joint.joint_net[-1].bias[blank] += shift
    return shift
