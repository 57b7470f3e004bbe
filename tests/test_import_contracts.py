"""Import contracts: the networks and the local training core can be read and tested without Flower.

Flower's own quickstart keeps `task.py` free of flwr the same way. Two checks per contract: the
source of each file names no `flwr` import (a lazy one inside a function included), and importing
all of them in a fresh interpreter loads no `flwr` module (an import through another medfed module
included).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = "flwr"

# (glob under the repository root, why these files must stay Flower-free)
FLOWER_FREE = [
    ("models/**/*.py", "the networks: built and tested alone, used by every side"),
    ("common/training/**/*.py", "the training core: loops, tasks, augmentation, patches, the "
                                "Opacus extension; run by sites, the aggregator and bench/"),
    ("client/predict/*.py", "`medfed predict`: runs a model file on a hospital's images, no "
                            "federation involved"),
]


def _files(pattern: str) -> list[Path]:
    return sorted(p for p in ROOT.glob(pattern) if p.is_file())


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def _is_forbidden(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


@pytest.mark.parametrize(("pattern", "reason"), FLOWER_FREE, ids=[p for p, _ in FLOWER_FREE])
def test_no_flower_import_in_the_source(pattern: str, reason: str) -> None:
    files = _files(pattern)
    assert files, f"{pattern} matches no file: update FLOWER_FREE to where the code moved"
    found = [
        f"{path.relative_to(ROOT)}:{line}: import {name}"
        for path in files
        for line, name in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        if _is_forbidden(name)
    ]
    assert not found, f"{pattern} ({reason}) must not import {FORBIDDEN}: {found}"


def test_importing_the_flower_free_modules_loads_no_flower() -> None:
    modules = sorted({_module(p) for pattern, _ in FLOWER_FREE for p in _files(pattern)})
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m == {FORBIDDEN!r} "
        f"or m.startswith({FORBIDDEN + '.'!r}))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], (
        f"importing {modules} loads {loaded[:5]}: one of them imports a module that imports "
        f"{FORBIDDEN}; find it with `python -X importtime -c 'import MODULE'`"
    )


def test_the_source_check_sees_a_lazy_flower_import() -> None:
    source = "def f():\n    from flwr.common import Context\n    import flwrish\n"
    assert [n for _, n in _imports(ast.parse(source)) if _is_forbidden(n)] == ["flwr.common"]
