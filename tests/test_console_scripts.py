"""The console scripts: each runs its server's command line, and where the ``server``
extra is missing it says what to install instead of ending in an import traceback."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from servers.extras import NEEDED, missing_packages
from tests.server_process import ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _run_script(target: str, *args: str, hidden: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``target`` ("module:function", as pyproject names it) run as its console script
    would be, with the ``hidden`` modules made unimportable."""
    module, function = target.split(":")
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({list(hidden)!r}))\n"
        f"sys.argv = ['script', *{list(args)!r}]\n"
        f"from {module} import {function}\n"
        f"{function}()\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_server_extra_provides_every_module_the_servers_check_for():
    assert {server: missing_packages(server) for server in NEEDED} == dict.fromkeys(NEEDED, [])


def test_a_server_script_without_the_server_extra_names_what_to_install():
    done = _run_script(SCRIPTS["pipecat-nvidia-asr"], "--help", hidden=("nemo",))
    assert done.returncode == 1
    assert "needs nemo_toolkit: pip install '.[server]' in a checkout of pipecat-nvidia" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_console_script_runs_its_servers_command_line(script):
    done = _run_script(SCRIPTS[script], "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")
