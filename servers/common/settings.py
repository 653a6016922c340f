"""CLI flags whose defaults come from environment variables, for every server."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


class EnvDefaultsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``add_setting`` reads each default from ``$ENV``.

    The help text names the variable, so ``--help`` documents both ways to set a value.
    """

    def __init__(self, *args: Any, env_prefix: str, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.env_prefix = env_prefix

    def add_setting(self, flag: str, default: Any, help: str, type: Callable[[str], Any] | None = None, **kwargs):
        name = flag.lstrip("-").replace("-", "_").upper()
        env_name = f"{self.env_prefix}{name}"
        cast = type or (lambda v: v)
        raw = os.environ.get(env_name)
        try:
            value = cast(raw) if raw not in (None, "") else default
        except ValueError as e:
            self.error(f"${env_name}={raw!r} is not valid: {e}")
        self.add_argument(flag, default=value, type=type, help=f"{help} [${env_name}]", **kwargs)
