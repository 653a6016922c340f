"""CLI flags whose defaults come from environment variables, for every server."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default but a secret's (a token set in the environment must not reach
    a log through ``--help``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if getattr(action, "secret", False):
            return action.help
        return super()._get_help_string(action)


class EnvDefaultsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``add_setting`` reads each default from ``$ENV``.

    The help text names the variable, so ``--help`` documents both ways to set a value.
    """

    def __init__(self, *args: Any, env_prefix: str, **kwargs: Any):
        kwargs.setdefault("formatter_class", _DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.env_prefix = env_prefix

    def add_setting(
        self,
        flag: str,
        default: Any,
        help: str,
        type: Callable[[str], Any] | None = None,
        *,
        secret: bool = False,
        **kwargs,
    ):
        """``secret``: ``--help`` does not show the value."""
        name = flag.lstrip("-").replace("-", "_").upper()
        env_name = f"{self.env_prefix}{name}"
        cast = type or (lambda v: v)
        raw = os.environ.get(env_name)
        try:
            value = cast(raw) if raw not in (None, "") else default
        except (ValueError, argparse.ArgumentTypeError) as e:
            self.error(f"${env_name}={raw!r} is not valid: {e}")
        choices = kwargs.get("choices")
        if raw not in (None, "") and choices is not None and value not in choices:
            self.error(f"${env_name}={raw!r} is not one of {', '.join(map(str, choices))}")
        action = self.add_argument(flag, default=value, type=type, help=f"{help} [${env_name}]", **kwargs)
        action.secret = secret


def device_name(value: str) -> str:
    """A device the servers can run on: auto, cpu, cuda or cuda:N."""
    kind, colon, index = value.partition(":")
    if value in ("auto", "cpu", "cuda") or (kind == "cuda" and colon and index.isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, not {value!r}")


def at_least(minimum: float, cast: Callable[[str], float] = int) -> Callable[[str], float]:
    """An argparse type for a number no smaller than ``minimum`` (a count, a size, a limit)."""

    def parse(value: str) -> float:
        number = cast(value)
        if not math.isfinite(number) or number < minimum:
            raise argparse.ArgumentTypeError(f"must be a number of at least {minimum}, not {value}")
        return number

    return parse


class DeviceSetting:
    """For settings dataclasses with a ``device`` field that may be "auto"."""

    device: str

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
"""What ``--precision`` takes: the model's autocast dtype (auto: bf16 on CUDA, fp32 on CPU)."""


def add_server_settings(p: EnvDefaultsParser, d: Any, model_help: str) -> None:
    """The flags every server has, with ``d``'s values as defaults."""
    p.add_setting("--model", d.model, model_help)
    p.add_setting("--host", d.host, "address to bind; 0.0.0.0 exposes the server to the network")
    p.add_setting("--port", d.port, "port for the WebSocket, /health and /metrics (0 picks a free one)", type=int)
    p.add_setting("--device", d.device, "cuda, cuda:N, cpu, or auto (cuda when available)", type=device_name)
    p.add_setting(
        "--precision",
        d.precision,
        "autocast for the model: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32",
        choices=PRECISIONS,
    )
    p.add_setting(
        "--max-sessions", d.max_sessions, "concurrent sessions; more are refused with server_full", type=at_least(1)
    )
    p.add_setting(
        "--max-message-bytes",
        d.max_message_bytes,
        "largest frame accepted; larger ones get message_too_big (above 4x the connection closes)",
        type=at_least(1),
    )
    add_access_settings(p, d.auth_token, d.log_level)


def add_access_settings(p: EnvDefaultsParser, auth_token: str | None, log_level: str) -> None:
    """The token clients must show (never printed by ``--help``) and the log level, for
    every server process."""
    p.add_setting(
        "--auth-token",
        auth_token,
        "if set, clients must send 'Authorization: Bearer <token>' (/health and /metrics stay open)",
        secret=True,
    )
    p.add_setting("--log-level", log_level, "loguru level", type=str.upper, choices=LOG_LEVELS)
