"""Build a random-weight streaming RNNT of a given shape and save it as .nemo for benchmarks.

Timing depends on shapes, not weight values: a model of the released checkpoint's shape
(``bench/shapes/nemotron_streaming_0.6b_shape.yaml``) with random weights times like the
real one. Its labels are 1024 single characters (the real model has 1024 BPE pieces: the
same joint size). The blank logit is calibrated on real speech so that about
``--emit-fraction`` of frames emit (random weights otherwise emit the maximum symbols on
every frame, which would overstate decoding cost).

    python -m bench.build_random_asr --out /tmp/nemotron_shape_random.nemo
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import soundfile as sf
import torch
from loguru import logger

from servers.asr.random_model import build_random_streaming_rnnt, calibrate_blank_bias, load_shape

BENCH = Path(__file__).resolve().parent
SPEECH = BENCH.parent / "tests" / "data" / "harvard_16k.wav"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=Path, default=BENCH / "shapes" / "nemotron_streaming_0.6b_shape.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--emit-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.monotonic()
    shape = load_shape(args.shape)
    labels = [chr(0x4E00 + i) for i in range(shape["vocab_size"])]
    model = build_random_streaming_rnnt(shape, labels=labels, seed=args.seed)
    model.encoder.set_default_att_context_size([70, 1])
    speech, _ = sf.read(SPEECH, dtype="float32")
    shift = calibrate_blank_bias(model, torch.from_numpy(speech), args.emit_fraction)
    params = sum(p.numel() for p in model.parameters())
    model.save_to(str(args.out))
    logger.info(
        f"{params / 1e6:.1f} M parameters, blank shift {shift:.3f}, saved {args.out} "
        f"in {time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
