"""The console scripts, each checking first that the ``server`` extra is installed.

The package without extras is the client side alone (no torch, NeMo or llama.cpp); a
server started there would end in an import traceback that names no remedy. Standard
library only: this module must import where the extra is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

INSTALL_SERVER_EXTRA = "pip install '.[server]' in a checkout of pipecat-nvidia"

_NEMO_SERVER = {"torch": "torch", "nemo": "nemo_toolkit", "prometheus_client": "prometheus-client"}
NEEDED: dict[str, dict[str, str]] = {
    "asr": _NEMO_SERVER,
    "tts": _NEMO_SERVER,
    "llm": {"llama_cpp": "llama-cpp-python", "prometheus_client": "prometheus-client", "aiohttp": "aiohttp"},
}
"""By server, the modules it imports from the extra and the distribution that holds each."""
NEEDED["host"] = {**NEEDED["asr"], **NEEDED["tts"], **NEEDED["llm"]}


def missing_packages(server: str) -> list[str]:
    """The distributions ``server`` ("asr", "tts", "llm" or "host") needs that are not installed."""
    return [package for module, package in NEEDED[server].items() if importlib.util.find_spec(module) is None]


def lacking_server_extra(server: str) -> str | None:
    """What ``server`` lacks here and how to install it ("needs ...: pip install ..."); None
    if nothing."""
    if missing := missing_packages(server):
        return (
            f"needs {', '.join(missing)}: {INSTALL_SERVER_EXTRA} "
            f'(with CMAKE_ARGS="-DGGML_CUDA=on" for a GPU\'s llama.cpp)'
        )
    return None


def require_server_extra(server: str) -> None:
    """Exit with the remedy if ``server`` cannot run here."""
    if lacking := lacking_server_extra(server):
        raise SystemExit(f"The {server} server {lacking}")


def _launcher(server: str, module: str) -> Callable[[], None]:
    """A console script: ``module``'s ``main`` once ``server``'s packages are known to be there."""

    def launch() -> None:
        require_server_extra(server)
        importlib.import_module(module).main()

    return launch


asr = _launcher("asr", "servers.asr.__main__")
tts = _launcher("tts", "servers.tts.__main__")
llm = _launcher("llm", "servers.llm.__main__")
host = _launcher("host", "scheduler.__main__")
