"""The Dockerfiles cannot be built here (no Docker engine); what can be checked is that
each one installs what the package is made of, for its own GPU, and starts the agent."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURES = {"Dockerfile.5090": "120", "Dockerfile.spark": "121"}


def _copied(dockerfile: str) -> set[str]:
    """Paths that COPY puts in the working directory under their own names."""
    placed = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, destination = line.split()[1:]
            for source in sources:
                target = f"{destination}{source}" if destination.endswith("/") else destination
                if target.removeprefix("./") == source:
                    placed.add(source)
    return placed


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_each_dockerfile_copies_every_package_the_project_installs(name):
    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    packages = {name.rstrip("*") for name in re.findall(r'"([^"]+)"', include.group(1))}
    assert packages
    copied = _copied((ROOT / name).read_text())
    assert packages | {"pyproject.toml", "README.md", "bot.py", ".env.example"} <= copied
    assert all((ROOT / source).exists() for source in copied)


@pytest.mark.parametrize(("name", "arch"), sorted(ARCHITECTURES.items()))
def test_each_dockerfile_builds_llama_cpp_for_its_gpu_and_starts_the_agent(name, arch):
    text = (ROOT / name).read_text()
    assert re.search(rf"^ARG CUDA_ARCH={arch}$", text, re.M)
    assert "-DGGML_CUDA=on" in text and "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH}" in text
    assert re.search(r'^CMD \["python", "bot.py", "--host", "0.0.0.0"\]$', text, re.M)


def test_the_build_context_leaves_out_secrets_and_the_test_environment_but_not_what_is_copied():
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert {".env", ".venv", ".git"} <= set(ignored)
    copied = set().union(*(_copied((ROOT / name).read_text()) for name in ARCHITECTURES))
    assert not any(fnmatch.fnmatch(source, pattern) for source in copied for pattern in ignored)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_each_dockerfile_keeps_only_the_images_torch_pinned_before_installing(name):
    """NVIDIA's image pins all it ships in /etc/pip/constraint.txt, older than our
    dependencies need; unpinned, its CUDA torch could be replaced by PyPI's."""
    lines = (ROOT / name).read_text().splitlines()
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    rewrites = [i for i, line in enumerate(lines) if "> /etc/pip/constraint.txt" in line]
    assert installs and len(rewrites) == 1 and rewrites[0] < min(installs)
    assert re.search(r"grep -iE '\^\(torch\|", lines[rewrites[0] - 1])
