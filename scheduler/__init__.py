"""The single-GPU scheduler and the local GPU host: torch (NeMo) and llama.cpp in one process.

On NVIDIA's PyTorch image (H100, 2026-11-22) llama.cpp crashed inside its model load or
first evaluation whenever torch was in the same process, unless the system libstdc++ had
been loaded globally before torch. Importing this package does that first.
"""

import ctypes
import sys

if sys.platform == "linux":
    try:
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass
