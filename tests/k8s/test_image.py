"""The Dockerfile and the Docker build context, checked offline.

The image runs medfed as a non-root user, exposes the ports the manifests use, carries the Flower
App's source and the torch pins; its build context can never carry data, runs, kits or keys.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.k8s.manifests import (
    PACKAGES,
    PYPROJECT,
    ROOT,
    UID,
    docker_user,
    dockerfile,
    instruction,
    ports,
    workloads,
)


def test_image_runs_medfed_as_a_non_root_user() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    assert docker_user() == UID
    assert json.loads(instruction("ENTRYPOINT")[-1]) == ["medfed"]
    assert json.loads(instruction("CMD")[-1]) == ["--help"]


def test_image_exposes_the_ports_the_manifests_use() -> None:
    exposed = {int(p) for args in instruction("EXPOSE") for p in args.split()}
    used = {port for _, workload in workloads() for port in ports(workload).values()}
    assert exposed == used == {9092, 9098, 9400, 9401, 9099}


def test_image_carries_the_flower_app_source() -> None:
    workdir, copied = "/", {}
    for keyword, args in dockerfile():
        if keyword == "WORKDIR":
            workdir = os.path.join(workdir, args)
        elif keyword == "COPY":
            *sources, dest = args.split()
            for source in sources:
                copied[source.rstrip("/")] = os.path.normpath(os.path.join(workdir, dest))
    app = "/opt/medfed/app"
    for package in PACKAGES:
        assert copied.get(package) == f"{app}/{package}", package
    assert copied.get("pyproject.toml") == copied.get("README.md") == app


def test_image_installs_the_torch_pyproject_pins_from_the_chosen_index() -> None:
    (run,) = [args for args in instruction("RUN") if "TORCH_INDEX_URL" in args]
    assert "--index-url \"$TORCH_INDEX_URL\"" in run
    assert any(a.startswith("TORCH_INDEX_URL=") for a in instruction("ARG"))
    # run the image's own look-up of the pin, as the build's shell would
    (lookup,) = re.findall(r'"\$\((python -c .*)\)"', run)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["sh", "-c", lookup], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    (torch,) = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert done.stdout.strip() == torch


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception `!`, regex) per line, in Docker's pattern syntax."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        patterns.append((negate, re.compile(regex)))
    return patterns


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` (or a folder above it) out of the build context."""
    parents = [str(Path(*Path(path).parts[: i + 1])) for i in range(len(Path(path).parts))]
    ignored = False
    for negate, regex in dockerignore_patterns():
        if any(regex.fullmatch(p) for p in parents):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    "path",
    [
        "data/demo/sites/hospital-01/labels.csv",
        "runs/demo/model.pt",
        "kits/server/server.key",
        "kits/sites/hospital-01/site.pub",
        "server.key",
        "common/stray/site.key",
        ".venv/bin/python",
        ".git/config",
        "server/__pycache__/app.cpython-311.pyc",
    ],
)
def test_build_context_leaves_out_data_runs_kits_keys_and_environments(path: str) -> None:
    assert dockerignored(path)


def test_build_context_keeps_everything_the_image_copies() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "pyproject.toml", "README.md", *PACKAGES],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert len(tracked) > len(PACKAGES)
    assert [p for p in tracked if dockerignored(p)] == []
