"""Random-weight Magpie TTS models (and codecs) of a given shape, for tests and benchmarks.

The shape file format is ``bench/shapes/magpie_tts_357m_shape.yaml`` (the released
checkpoint's shapes). The text tokenizer is NeMo's ``EnglishCharsTokenizer`` (it needs no
files), registered under the English phoneme tokenizer's name so that English finds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import OmegaConf

_MODULES = "nemo.collections.tts.modules.audio_codec_modules"
_LOSSES = "nemo.collections.tts.losses.audio_codec_loss"


def build_random_codec(codec: Mapping[str, Any], seed: int = 0):
    """An ``AudioCodecModel`` (FSQ, HiFiGAN encoder, causal HiFiGAN decoder) of this shape."""
    from nemo.collections.tts.models import AudioCodecModel

    quantizer, decoder, encoder = codec["vector_quantizer"], codec["audio_decoder"], codec["audio_encoder"]
    cfg = OmegaConf.create(
        {
            "sample_rate": codec["sample_rate"],
            "samples_per_frame": codec["samples_per_frame"],
            "loss_resolutions": [[1024, 256, 1024]],
            "mel_loss_dims": [64],
            "commit_loss_scale": 0.0,
            "audio_encoder": {
                "_target_": f"{_MODULES}.HiFiGANEncoder",
                **{k: v for k, v in encoder.items() if k != "type"},
            },
            "vector_quantizer": {
                "_target_": f"{_MODULES}.GroupFiniteScalarQuantizer",
                **{k: v for k, v in quantizer.items() if k != "type"},
            },
            "audio_decoder": {
                "_target_": f"{_MODULES}.CausalHiFiGANDecoder",
                **{k: v for k, v in decoder.items() if k != "type"},
            },
            "generator_loss": {"_target_": f"{_LOSSES}.GeneratorSquaredLoss"},
            "discriminator_loss": {"_target_": f"{_LOSSES}.DiscriminatorSquaredLoss"},
        }
    )
    torch.manual_seed(seed)
    return AudioCodecModel(cfg=cfg).eval()


def _magpie_config(magpie: Mapping[str, Any], codec_path: str):
    def transformer(part: Mapping[str, Any]) -> dict[str, Any]:
        return {"p_dropout": 0.0, "apply_norm_out": True, "use_learnable_pos_emb": True, **dict(part)}

    local = magpie["local_transformer"]
    return OmegaConf.create(
        {
            "model_type": magpie["model_type"],
            "codecmodel_path": codec_path,
            "embedding_dim": magpie["embedding_dim"],
            "frame_stacking_factor": magpie["frame_stacking_factor"],
            "text_tokenizers": {
                "english_phoneme": {
                    "_target_": "nemo.collections.common.tokenizers.text_to_speech.tts_tokenizers.EnglishCharsTokenizer",
                    "punct": True,
                    "apostrophe": True,
                    "pad_with_space": False,
                }
            },
            "encoder": transformer(magpie["encoder"]),
            "context_encoder": transformer(magpie["context_encoder"]),
            "decoder": transformer(magpie["decoder"]),
            "local_transformer_type": local["type"],
            "local_transformer_n_layers": local["n_layers"],
            "local_transformer_n_heads": local["n_heads"],
            "local_transformer_hidden_dim": local["hidden_dim"],
            "prior_scaling_factor": None,
            "prior_end_step": 0,
            "prior_scaledown_start_step": 0,
            "alignment_loss_scale": 0.0,
            "use_kv_cache_for_inference": False,
            "inference_parameters": dict(magpie["inference_parameters"]),
        }
    )


def build_random_magpie(magpie: Mapping[str, Any], codec_path: str, seed: int = 0):
    """A ``MagpieTTSModel`` of this shape using the codec saved at ``codec_path``, with
    ``baked_context.speakers`` random baked voices of ``baked_context.T`` frames."""
    from nemo.collections.tts.models import MagpieTTSModel

    torch.manual_seed(seed)
    model = MagpieTTSModel(cfg=_magpie_config(magpie, codec_path))
    baked = magpie["baked_context"]
    speakers, frames, dim = baked["speakers"], baked["T"], magpie["embedding_dim"]
    embedding = torch.nn.Embedding(speakers, frames * dim)
    embedding.weight.data.normal_(0.0, 0.02)
    embedding.weight.requires_grad_(False)
    model.baked_context_embedding = embedding
    model._baked_embedding_T = torch.tensor(frames)
    model._baked_embedding_D = torch.tensor(dim)
    model.baked_context_embedding_len = torch.full((speakers,), frames, dtype=torch.long)
    return model.eval()


@torch.no_grad()
def suppress_end_of_speech(model) -> None:
    """Random weights end speech after a few frames; make them speak until the length cap."""
    tokens = model.num_all_tokens_per_codebook
    for k in range(model.num_audio_codebooks * model.frame_stacking_factor):
        model.final_proj.bias[k * tokens + model.audio_eos_id] = -1e4
        model.local_transformer_out_projections[k].bias[model.audio_eos_id] = -1e4
