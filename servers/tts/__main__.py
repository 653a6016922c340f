"""``python -m servers.tts``: run the Magpie TTS server until interrupted."""

from __future__ import annotations

from servers.common.cli import run_server
from servers.tts.config import parse_settings
from servers.tts.server import TtsServer


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    run_server(TtsServer(settings), settings.log_level)


if __name__ == "__main__":
    main()
