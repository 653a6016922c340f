"""``python -m servers.llm``: run the OpenAI-compatible LLM server until interrupted."""

from __future__ import annotations

from servers.common.cli import run_server
from servers.llm.config import parse_settings
from servers.llm.server import LlmServer


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    run_server(LlmServer(settings), settings.log_level)


if __name__ == "__main__":
    main()
