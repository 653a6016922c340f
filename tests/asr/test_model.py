"""Loading the streaming model: decoder settings that only matter on a GPU."""

import pytest
import torch

from servers.asr.model import load_streaming_model, use_label_looping_greedy
from tests.asr.helpers import transcribe


def test_gpu_decoding_is_pinned_to_cuda_graphs_that_need_no_nvrtc(tiny_asr_path):
    """NeMo 3.0's full-graph decoder compiles with NVRTC, which corrupts the process's
    b" " (NVIDIA-NeMo/Speech#15790): on an H100 every HTTP request to the server then
    failed. Pinned means NeMo may not upgrade to full graphs where CUDA supports them."""
    model = load_streaming_model(str(tiny_asr_path), right_context=1, device="cpu")
    use_label_looping_greedy(model, torch.device("cuda"))
    computer = model.decoding.decoding.decoding_computer
    assert computer.cuda_graphs_mode is computer.CudaGraphsMode.NO_WHILE_LOOPS
    assert not computer.cuda_graphs_allow_fallback


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_transcribing_on_a_gpu_leaves_python_bytes_intact(tiny_asr_path, speech_int16):
    from servers.asr.engine import StreamingASREngine

    model = load_streaming_model(str(tiny_asr_path), right_context=1, device="cuda")
    engine = StreamingASREngine(model, right_context=1)
    assert transcribe(engine, speech_int16[16000 : 16000 * 3], trailing_silence_ms=200)[-1].is_final
    assert b"GET / HTTP/1.1".split(b" ") == [b"GET", b"/", b"HTTP/1.1"]
