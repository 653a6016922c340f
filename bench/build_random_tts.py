"""Build a random-weight Magpie TTS (and its codec) of a given shape for benchmarks.

Timing depends on shapes, not weight values: a model of the released checkpoint's shape
(``bench/shapes/magpie_tts_357m_shape.yaml``: 302 M parameters plus a 62.6 M NanoCodec)
with random weights times like the real one. Random weights never end speech on their
own, so end of speech is suppressed and the server's length cap ends each segment: run
the server with ``--max-frames-per-token 1.5`` (about the speaking rate of real speech)
and say so beside every figure.

    python -m bench.build_random_tts --out /tmp/magpie_random
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from loguru import logger
from omegaconf import OmegaConf

from servers.tts.random_model import build_random_codec, build_random_magpie, suppress_end_of_speech

BENCH = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=Path, default=BENCH / "shapes" / "magpie_tts_357m_shape.yaml")
    parser.add_argument("--out", type=Path, required=True, help="directory for magpie.nemo and codec.nemo")
    args = parser.parse_args()

    started = time.monotonic()
    shape = OmegaConf.to_container(OmegaConf.load(args.shape), resolve=True)
    args.out.mkdir(parents=True, exist_ok=True)
    codec_path = args.out / "codec.nemo"
    build_random_codec(shape["codec"]).save_to(str(codec_path))
    model = build_random_magpie(shape["magpie"], str(codec_path))
    suppress_end_of_speech(model)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("_codec_model"))
    model.save_to(str(args.out / "magpie.nemo"))
    logger.info(f"Magpie {params / 1e6:.1f} M parameters; saved in {args.out} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
