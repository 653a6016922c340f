"""A tiny random Magpie TTS and codec, saved as .nemo files like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from servers.tts.random_model import build_random_codec, build_random_magpie, suppress_end_of_speech

_TRANSFORMER = {"d_model": 64, "d_ffn": 256, "sa_n_heads": 2, "max_length_causal_mask": 512}
TINY_SHAPE = {
    "codec": {
        "sample_rate": 22050,
        "samples_per_frame": 1024,
        "vector_quantizer": {"num_groups": 4, "num_levels_per_group": [4, 4]},
        "audio_decoder": {
            "input_dim": 8,
            "up_sample_rates": [8, 8, 4, 2, 2],
            "base_channels": 64,
            "activation": "half_snake",
            "output_activation": "clamp",
            "pad_mode": "zeros",
            "n_groups_equal_to_out_channels": True,
        },
        "audio_encoder": {
            "encoded_dim": 8,
            "down_sample_rates": [2, 2, 4, 8, 8],
            "base_channels": 4,
            "activation": "lrelu",
            "pad_mode": "replicate",
        },
    },
    "magpie": {
        "model_type": "decoder_ce",
        "embedding_dim": 64,
        "frame_stacking_factor": 2,
        "encoder": {**_TRANSFORMER, "n_layers": 2, "kernel_size": 3, "is_causal": True, "has_xattn": False},
        "context_encoder": {**_TRANSFORMER, "n_layers": 1, "kernel_size": 3, "is_causal": False, "has_xattn": False},
        "decoder": {
            **_TRANSFORMER,
            "n_layers": 2,
            "kernel_size": 1,
            "is_causal": True,
            "has_xattn": True,
            "xa_d_memory": 64,
            "xa_n_heads": 1,
            "xa_d_head": 32,
            "apply_norm_to_cond": True,
        },
        "local_transformer": {"type": "autoregressive", "n_layers": 1, "n_heads": 1, "hidden_dim": 64},
        "baked_context": {"speakers": 2, "T": 20},
        "inference_parameters": {
            "temperature": 0.6,
            "topk": 10,
            "cfg_scale": 2.5,
            "max_decoder_steps": 500,
            "attention_prior_epsilon": 0.1,
            "attention_prior_lookahead_window": 6,
            "estimate_alignment_from_layers": [0, 1],
            "apply_prior_to_layers": [0, 1],
            "min_generated_frames": 4,
        },
    },
}


def build_tiny_tts_checkpoint(directory: Path) -> Path:
    """Save ``codec.nemo`` and ``tiny_magpie.nemo`` in ``directory``; returns the Magpie path.

    Random initialisation is so flat that greedy decoding gives every text the same codes;
    sharper weights make the output depend on text and voice, so a mix-up between rows
    would show. End of speech is suppressed: segments run to the server's length cap.
    """
    codec_path = directory / "codec.nemo"
    build_random_codec(TINY_SHAPE["codec"]).save_to(str(codec_path))
    model = build_random_magpie(TINY_SHAPE["magpie"], str(codec_path))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("_codec_model") and parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    suppress_end_of_speech(model)
    path = directory / "tiny_magpie.nemo"
    model.save_to(str(path))
    return path
