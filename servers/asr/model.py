"""Loading a cache-aware streaming RNNT checkpoint and reading its streaming geometry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from omegaconf import open_dict

from servers.common.nemo_logs import stop_nemo_log_buffers

STREAMABLE_NORMALIZE = (None, "NA", "none", "")
"""Per-utterance feature normalisation cannot be computed chunk by chunk."""


@dataclass(frozen=True)
class StreamingGeometry:
    """Sizes of one streaming step, read from ``encoder.streaming_cfg`` (never hard-coded).

    Mel frame ``f`` is centred on sample ``f * hop`` and computable once samples up to
    ``f * hop + n_fft // 2`` exist. The first step takes ``first_chunk_frames`` frames
    without pre-encode cache; every later step ``chunk_frames`` new frames after
    ``pre_encode_cache_frames`` cached ones. Both give ``out_frames`` encoder frames.
    """

    sample_rate: int
    hop: int
    n_fft: int
    n_mels: int
    right_context: int
    first_chunk_frames: int
    chunk_frames: int
    pre_encode_cache_frames: int
    drop_extra_pre_encoded: int
    out_frames: int

    @property
    def chunk_ms(self) -> float:
        return 1000.0 * self.chunk_frames * self.hop / self.sample_rate

    @property
    def first_step_samples(self) -> int:
        """Utterance samples before the first step can run."""
        return self.samples_for_frames(self.first_chunk_frames)

    @property
    def step_samples(self) -> int:
        """Samples each later step adds."""
        return self.chunk_frames * self.hop

    @property
    def finalize_audio_ms(self) -> float:
        """Trailing audio after the last word that a finalize must give the encoder.

        (R + 1) x 160 ms, i.e. two chunks: one to complete the chunk holding the end of
        speech, one more for the token the model emits with a chunk's delay.
        """
        return 2.0 * self.chunk_ms

    @property
    def max_final_frames(self) -> int:
        """New mel frames of the longest final step: the engine runs a final whole only up
        to the finalize padding plus a chunk of audio still buffered (more, for a client
        ahead of real time, advances chunk by chunk first)."""
        return self.frames_at_end(self.ms_to_samples(self.finalize_audio_ms + self.chunk_ms))

    @property
    def left_context_frames(self) -> int:
        """Mel frames of audio before frame ``f`` that frame ``f`` depends on, rounded up:
        half an FFT window plus the one sample pre-emphasis looks back."""
        return math.ceil((self.n_fft // 2 + 1) / self.hop)

    @property
    def least_buffer_samples(self) -> int:
        """Audio a session must be able to hold for its next step to become ready: the
        first chunk, or a later chunk with the frames of left context kept before it."""
        return max(self.first_step_samples, self.samples_for_frames(self.left_context_frames + self.chunk_frames))

    def samples_for_frames(self, n_frames: int) -> int:
        """Samples needed before frames ``0 .. n_frames - 1`` can be computed."""
        return (n_frames - 1) * self.hop + self.n_fft // 2

    def frames_in(self, n_samples: int) -> int:
        """Frames computable from ``n_samples`` samples of a still-growing utterance."""
        return max(0, (n_samples - self.n_fft // 2) // self.hop + 1)

    def frames_at_end(self, n_samples: int) -> int:
        """Frames of a finished utterance of ``n_samples`` samples, counted as NeMo does."""
        return n_samples // self.hop

    def ms_to_samples(self, ms: float) -> int:
        return round(ms * self.sample_rate / 1000.0)


def resolve_context(model, right_context: int) -> list[int]:
    """The ``[left, right]`` attention context of ``model`` with this right context."""
    available = [list(c) for c in model.encoder.att_context_size_all]
    for context in available:
        if context[1] == right_context:
            return context
    raise ValueError(
        f"the model has no attention context with right context {right_context}; "
        f"it offers {available} (right context = second number)"
    )


def read_geometry(model, right_context: int) -> StreamingGeometry:
    featurizer = model.preprocessor.featurizer
    cfg = model.encoder.streaming_cfg
    return StreamingGeometry(
        sample_rate=int(model.preprocessor._sample_rate),
        hop=int(featurizer.hop_length),
        n_fft=int(featurizer.n_fft),
        n_mels=int(featurizer.nfilt),
        right_context=right_context,
        first_chunk_frames=int(cfg.chunk_size[0]),
        chunk_frames=int(cfg.shift_size[1]),
        pre_encode_cache_frames=int(cfg.pre_encode_cache_size[1]),
        drop_extra_pre_encoded=int(cfg.drop_extra_pre_encoded),
        out_frames=int(cfg.valid_out_len),
    )


def _check_streamable(model) -> None:
    from nemo.collections.asr.models import EncDecRNNTModel
    from nemo.collections.asr.parts.mixins.streaming import StreamingEncoder

    if not isinstance(model, EncDecRNNTModel):
        raise ValueError(f"{type(model).__name__} is not an RNNT model")
    if not isinstance(model.encoder, StreamingEncoder) or model.encoder.att_context_style != "chunked_limited":
        raise ValueError("the encoder is not a cache-aware streaming encoder (att_context_style chunked_limited)")
    featurizer = model.preprocessor.featurizer
    if featurizer.normalize not in STREAMABLE_NORMALIZE:
        raise ValueError(f"feature normalisation {featurizer.normalize!r} is per utterance and cannot stream")
    if featurizer.exact_pad:
        raise ValueError("preprocessor exact_pad=True is not supported (centred STFT frames are assumed)")


def use_label_looping_greedy(model, device: torch.device) -> None:
    """Batched greedy decoding whose state can be carried between steps as tensors."""
    decoding_cfg = model.cfg.decoding
    with open_dict(decoding_cfg):
        decoding_cfg.strategy = "greedy_batch"
        decoding_cfg.greedy.loop_labels = True
        decoding_cfg.greedy.use_cuda_graph_decoder = device.type == "cuda"
        decoding_cfg.greedy.max_symbols = decoding_cfg.greedy.get("max_symbols") or 10
    model.change_decoding_strategy(decoding_cfg, verbose=False)
    if device.type == "cuda":
        # NeMo 3.0's full-graph mode compiles its loop conditions with NVRTC through
        # run_nvrtc, which writes into CPython's shared b" " object and breaks every later
        # b" " in the process, e.g. websockets' HTTP parsing (NVIDIA-NeMo/Speech#15790).
        # Partial graphs need no NVRTC.
        model.decoding.decoding.decoding_computer.force_cuda_graphs_mode("no_while_loops")


def load_streaming_model(name_or_path: str, *, right_context: int, device: str | torch.device):
    """Load a cache-aware streaming RNNT from a ``.nemo`` path or a Hugging Face name.

    A name is downloaded to the Hugging Face cache on first use (with progress bars).
    Returns the model in eval mode on ``device``, set to ``[left, right_context]``.
    """
    from nemo.collections.asr.models import ASRModel

    stop_nemo_log_buffers()
    device = torch.device(device)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".nemo" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        logger.info(f"Loading ASR checkpoint {path}")
        model = ASRModel.restore_from(str(path), map_location=device)
    else:
        logger.info(f"Loading ASR model {name_or_path} (downloaded to the Hugging Face cache on first use)")
        model = ASRModel.from_pretrained(name_or_path, map_location=device)
    _check_streamable(model)
    # A restored model comes back at its first listed context, whatever it was saved with.
    model.encoder.set_default_att_context_size(resolve_context(model, right_context))
    model.preprocessor.featurizer.pad_to = 0
    use_label_looping_greedy(model, device)
    model.to(device)
    model.eval()
    return model


def token_pieces(model) -> list[str]:
    """Text of each token id, with word boundaries as spaces, so text grows token by token."""
    vocab_size = model.joint.num_classes_with_blank - 1
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [str(label) for label in model.joint.vocabulary]
    return [piece.replace("\u2581", " ") for piece in tokenizer.ids_to_tokens(list(range(vocab_size)))]
