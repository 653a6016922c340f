"""Loading a Magpie TTS checkpoint, its codec, voices and languages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from omegaconf import OmegaConf

from servers.common.nemo_logs import stop_nemo_log_buffers


@dataclass(frozen=True)
class SamplingSettings:
    """Local-transformer sampling; None keeps the checkpoint's own value."""

    temperature: float | None = None
    """0 or less samples greedily (deterministic)."""
    topk: int | None = None
    cfg_scale: float | None = None


def _restore_with_codec(path: Path, codec: str | None, device: torch.device):
    """Restore a local Magpie ``.nemo``, pointing it at its codec.

    A Magpie ``.nemo`` stores only its codec's absolute path (or a Hugging Face name), not
    the codec itself: a checkpoint copied to another machine must be told where the codec
    now lies (``codec``), or finds it beside itself as ``codec.nemo``.
    """
    from nemo.collections.tts.models import MagpieTTSModel

    cfg = MagpieTTSModel.restore_from(str(path), return_config=True)
    OmegaConf.set_struct(cfg, False)
    stored = str(cfg.codecmodel_path)
    beside = path.with_name("codec.nemo")
    if codec is not None:
        cfg.codecmodel_path = codec
    elif not stored.startswith("nvidia/") and not Path(stored).exists():
        if not beside.exists():
            raise FileNotFoundError(
                f"{path} refers to its codec at {stored}, which does not exist; pass --codec PATH "
                f"or put the codec beside the checkpoint as {beside}"
            )
        cfg.codecmodel_path = str(beside)
    return MagpieTTSModel.restore_from(str(path), override_config_path=cfg, map_location=device)


def load_magpie(
    name_or_path: str,
    *,
    device: str | torch.device,
    codec: str | None = None,
    sampling: SamplingSettings = SamplingSettings(),
):
    """Load a Magpie TTS model with baked voices from a ``.nemo`` path or a Hugging Face name.

    A name is downloaded to the Hugging Face cache on first use (with progress bars).
    """
    from nemo.collections.tts.models import MagpieTTSModel

    stop_nemo_log_buffers()
    device = torch.device(device)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".nemo" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        logger.info(f"Loading TTS checkpoint {path}")
        model = _restore_with_codec(path, codec, device)
    else:
        logger.info(f"Loading TTS model {name_or_path} (downloaded to the Hugging Face cache on first use)")
        model = MagpieTTSModel.from_pretrained(name_or_path, map_location=device)
    if not model.has_baked_context_embedding:
        raise ValueError("the checkpoint has no baked voices (baked_context_embedding); only those are supported")
    _make_tokenizers_deterministic(model)
    params = model.inference_parameters
    for field in ("temperature", "topk", "cfg_scale"):
        value = getattr(sampling, field)
        if value is not None:
            setattr(params, field, value)
    model.to(device)
    model.eval()
    return model


def _make_tokenizers_deterministic(model) -> None:
    """Phonemize every word: the tokenizers are built in training mode, where a random
    fifth of words stays spelled out (NeMo's own inference runner does the same)."""
    for tokenizer in model.tokenizer.tokenizers.values():
        g2p = getattr(tokenizer, "g2p", None)
        if g2p is not None and hasattr(g2p, "phoneme_probability"):
            g2p.phoneme_probability = 1.0


def voices(model, names: list[str] | None = None) -> list[str]:
    """The checkpoint's baked voices, by ``names`` when given (the checkpoint has only indices)."""
    count = int(model.num_baked_speakers)
    if names:
        if len(names) != count:
            raise ValueError(f"{len(names)} voice names given for {count} baked voices")
        return list(names)
    return [str(i) for i in range(count)]


def languages(model) -> list[str]:
    """Languages with a tokenizer of their own in this checkpoint."""
    from nemo.collections.tts.parts.utils.tts_dataset_utils import LANGUAGE_TOKENIZER_MAP

    available = set(model.tokenizer.tokenizers)
    return sorted(lang for lang, names in LANGUAGE_TOKENIZER_MAP.items() if available & set(names))
