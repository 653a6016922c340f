"""Finding and loading the GGUF: a local path, or a Hugging Face repository whose
quantisation is chosen by the GPU memory that is free."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

DEFAULT_MODEL = "unsloth/Nemotron-3-Nano-30B-A3B-GGUF"
Q8_MIN_FREE_GIB = 64.0
"""Q8_0 (~34 GB) when this much GPU memory is free (a 128 GB DGX Spark); else Q4_K_M
(~25 GB, fits a 32 GB RTX 5090 beside the speech models)."""


@dataclass(frozen=True)
class GgufSource:
    path: str | None = None
    repo: str | None = None
    pattern: str | None = None
    """A glob of the file in ``repo`` (``*Q4_K_M*.gguf``)."""

    def describe(self) -> str:
        return self.path or f"{self.repo} ({self.pattern})"


def resolve_source(model: str, quant: str = "auto") -> GgufSource:
    """``model`` is a ``.gguf`` path, ``owner/repo`` or ``owner/repo:FILE-GLOB``."""
    if ":" not in model and (model.endswith(".gguf") or Path(model).exists()):
        if not Path(model).is_file():
            raise FileNotFoundError(f"no GGUF file at {model}")
        return GgufSource(path=model)
    repo, _, pattern = model.partition(":")
    if not pattern:
        if quant == "auto":
            free = gpu_free_gib()
            quant = "Q8_0" if free is not None and free >= Q8_MIN_FREE_GIB else "Q4_K_M"
            logger.info(f"LLM quantisation {quant} (free GPU memory: {'none' if free is None else f'{free:.0f} GiB'})")
        pattern = f"*{quant}*.gguf"
    return GgufSource(repo=repo, pattern=pattern)


def load_llama(
    source: GgufSource,
    *,
    context_size: int = 8192,
    gpu_layers: int = -1,
    main_gpu: int | None = None,
    flash_attention: bool = True,
    threads: int | None = None,
):
    """A ``llama_cpp.Llama`` for the source (downloaded to the HF cache with progress);
    ``main_gpu``: on that GPU alone, not split over all."""
    from llama_cpp import LLAMA_SPLIT_MODE_NONE, Llama

    options = dict(
        n_ctx=context_size,
        n_gpu_layers=gpu_layers,
        flash_attn=flash_attention,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    if main_gpu is not None:
        options.update(split_mode=LLAMA_SPLIT_MODE_NONE, main_gpu=main_gpu)
    if source.path is not None:
        return Llama(model_path=source.path, **options)
    return Llama.from_pretrained(repo_id=source.repo, filename=source.pattern, **options)


def gpu_free_gib() -> float | None:
    """Most free memory on any GPU llama.cpp can use (None on a CPU-only build)."""
    from llama_cpp._ggml import libggml

    lib = libggml
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_memory.restype = None
    size_p = ctypes.POINTER(ctypes.c_size_t)
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
    gpu_types = {1, 2}  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU
    free_bytes = []
    for i in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(device) in gpu_types:
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
            free_bytes.append(free.value)
    return max(free_bytes) / 2**30 if free_bytes else None
