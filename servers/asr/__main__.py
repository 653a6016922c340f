"""``python -m servers.asr``: run the streaming ASR server until interrupted."""

from __future__ import annotations

from servers.asr.config import parse_settings
from servers.asr.server import AsrServer
from servers.common.cli import run_server


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    run_server(AsrServer(settings), settings.log_level)


if __name__ == "__main__":
    main()
