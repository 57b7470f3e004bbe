"""The k8s tests' shared part.

The builds (kustomize inside kubectl), the ports and names the manifests use, helpers to read a
built resource, and the Dockerfile's instructions as Docker reads them.
"""

import functools
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.medfed.helpers import require_tool

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"
K8S_VERSION = "1.37.0"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# The packages of the distribution, hence of the Flower App the image carries.
PACKAGES = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]

# k8s/monitoring/grafana-dashboard.json links to monitoring/grafana-dashboard.json, outside the
# kustomization's folder: kustomize follows it only when told to (k8s/README.md says so too).
LOAD_ANYWHERE = ("--load-restrictor", "LoadRestrictionsNone")
BUILDS = {
    **{
        f"overlays/{d.name}": d
        for d in sorted((K8S / "overlays").iterdir())
        if (d / "kustomization.yaml").is_file()
    },
    "monitoring": K8S / "monitoring",
}

UID = 10001
AGGREGATOR, SITE = "medfed-aggregator", "medfed-site"
FLEET_PORT, AGGREGATOR_HEALTH, AGGREGATOR_METRICS = 9092, 9098, 9400
SITE_METRICS, SITE_HEALTH = 9401, 9099
GPU = "nvidia.com/gpu"


@functools.cache
def _built(name: str) -> tuple[dict[str, Any], ...]:
    flags = LOAD_ANYWHERE if name == "monitoring" else ()
    done = subprocess.run(
        [str(KUBECTL), "kustomize", *flags, str(BUILDS[name])],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize k8s/{name} failed:\n{done.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def build(name: str) -> tuple[dict[str, Any], ...]:
    """The resources of `kubectl kustomize k8s/NAME`."""
    require_tool(str(KUBECTL), "install the dev dependencies: pip install -e '.[dev]'")
    return _built(name)


def find(resources: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any] | None:
    hits = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(hits) <= 1, f"{len(hits)} {kind}s named {name}"
    return hits[0] if hits else None


def builds_with(kind: str, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(build, resource) for every build that has this resource; at least one must."""
    found = [(b, r) for b in BUILDS if (r := find(build(b), kind, name)) is not None]
    assert found, f"no build under k8s/ has {kind} {name}"
    yield from found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def flags(args: list[str]) -> dict[str, str]:
    """`server --kit /kit --port 9092` -> {"--kit": "/kit", "--port": "9092"}."""
    return dict(zip(args[1::2], args[2::2], strict=True))


def mounts(deployment: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mountPath -> (volumeMount, volume)."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container(deployment)["volumeMounts"]}


def ports(deployment: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}


def workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in BUILDS:
        for r in build(name):
            if r["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
                yield f"{name}: {r['kind']}/{r['metadata']['name']}", r


DOCKERFILE = ROOT / "Dockerfile"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined as Docker joins them."""
    instructions, line = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") or (not line and not raw.strip()):
            continue  # Docker drops comment lines, also inside a continued instruction
        if re.search(r"\\[ \t]*$", raw):
            line += re.sub(r"\\[ \t]*$", "", raw)
            continue
        line += raw
        keyword, _, args = line.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        line = ""
    return instructions


def instruction(keyword: str) -> list[str]:
    return [args for k, args in dockerfile() if k == keyword]


def docker_user() -> int:
    user = instruction("USER")[-1]
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user}: numeric, so kubelet can verify it"
    return int(user.split(":")[0])
