"""Import contracts: the folders say who runs what, and `make test` keeps them saying it.

1. The networks and the local training core can be read and tested without Flower (Flower's own
   quickstart keeps `task.py` free of flwr the same way). Two checks: the source of each file
   names no `flwr` import (a lazy one inside a function included), and importing all of them in
   a fresh interpreter loads no `flwr` module (an import through another medfed module included).
2. The layers: `client/` (what runs in a hospital) and `server/` (what runs at the aggregator)
   do not import each other, nor what is built on them (`simulations/`, `bench/`, `medfed/`);
   both build on `models/` and `common/`, which import none of those. With every layer's own
   imports checked, no chain of imports can lead from `client/` to `server/` or back.
3. The runners: only the CLI (`medfed/`) imports them; see RUNNERS.
4. Flower's internals are patched in one place, common/flower_compat/ (version-gated, with the
   evidence): no other module assigns to, deletes from or `setattr`s a Flower module or class,
   or overrides a private method of a Flower class it subclasses.

Every import in a file counts: at the top, inside a function (lazy), relative, or
`importlib.import_module("...")` with a literal name.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
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


# --- the layers -----------------------------------------------------------------------------------

BUILT_ON_SIDES = ("simulations", "bench", "medfed")
# (folder, the top-level packages its files must not import, why)
LAYERS = [
    ("client", ("server", *BUILT_ON_SIDES), "runs in a hospital: nothing of the aggregator"),
    ("server", ("client", *BUILT_ON_SIDES), "runs at the aggregator: nothing of a hospital's"),
    ("common", ("client", "server", *BUILT_ON_SIDES), "shared by both sides: neither side's"),
    ("models", ("client", "server", "common", *BUILT_ON_SIDES), "the networks: stand alone"),
]


def _package_files() -> list[Path]:
    """Every source file of medfed's top-level packages (tests/ excluded)."""
    return sorted(
        p for init in ROOT.glob("*/__init__.py") if init.parent.name != "tests"
        for p in init.parent.rglob("*.py")
        if not p.is_relative_to(ROOT / "bench" / "out")  # what `make bench` writes
    )


def _imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every module `path` imports, `from a import b` giving a and a.b."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    return _imported_from(path.read_text(encoding="utf-8"), package, str(path))


def _imported_from(source: str, package: str, filename: str) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the file's own package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        elif (
            isinstance(node, ast.Call) and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
        ):
            yield node.lineno, node.args[0].value


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize(("folder", "forbidden", "reason"), LAYERS, ids=[f for f, *_ in LAYERS])
def test_each_layer_imports_only_what_is_below_it(
    folder: str, forbidden: tuple[str, ...], reason: str
) -> None:
    files = _files(f"{folder}/**/*.py")
    assert files, f"{folder}/ has no file: update LAYERS"
    found = sorted({
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in files for line, name in _imported(path)
        if any(_within(name, package) for package in forbidden)
    })
    assert not found, (
        f"{folder}/ ({reason}) must not import {', '.join(forbidden)}: {found}. Move what both "
        "need to common/ (or the training core, common/training/)"
    )


# --- the runners ----------------------------------------------------------------------------------

# A runner is a module with an entry point that runs one whole command (or, for the two Flower
# Apps, what Flower starts for it). Only the CLI starts them: medfed/ imports them; tests/ and
# bench/ may too. server/run.py (the federation loop) is not one: it has no entry point of its
# own, the ServerApp runs it, and its RoundUpdate is read by the exporter and the watchers.
# {runner: (what starts it, the other modules allowed to import it)}
RUNNERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "simulations.runner": ("`medfed simulate`: a whole federation in one process (Ray)", ()),
    "server.app": (
        "the ServerApp: Flower's SuperLink starts it for `medfed run` (pyproject's "
        "`serverapp = \"server.app:app\"`); `medfed simulate` runs it in-process",
        ("simulations.runner",),
    ),
    "client.app": (
        "the ClientApp's work: the site's warm worker runs it for every message of a deployed "
        "site; `medfed simulate` runs it in-process",
        ("simulations.runner", "client.worker", "client.shim"),
    ),
    "client.shim": (
        "the ClientApp Flower's SuperNode starts at each site of `medfed site` (pyproject's "
        "`clientapp = \"client.shim:app\"`): hands each message to the warm worker",
        ("client.launchpad",),  # imports it once, for the ClientApp processes it forks
    ),
    "client.worker": ("the site's warm worker: `medfed site` starts it (`python -m`)", ()),
    "client.supernode": ("`medfed site`: the site's SuperNode process", ()),
    "server.superlink": ("`medfed server`: the SuperLink, its gateway and site registry", ()),
    "server.submit": ("`medfed run`/`runs`/`stop`: Flower's CLI for the operator", ()),
}
CLI_AND_TOOLS = ("medfed", "bench", "tests")


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_only_the_cli_imports_the_runners(runner: str) -> None:
    started_by, allowed = RUNNERS[runner]
    assert (ROOT / (runner.replace(".", "/") + ".py")).is_file(), f"{runner} moved: update RUNNERS"
    found = sorted({
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in _package_files()
        if path.relative_to(ROOT).parts[0] not in CLI_AND_TOOLS
        and _module(path) != runner and _module(path) not in allowed
        for line, name in _imported(path) if _within(name, runner)
    })
    assert not found, (
        f"{runner} ({started_by}) is imported outside the CLI: {found}. Move what these need "
        "out of the runner, to common/ or the side's own modules"
    )


def test_flower_finds_the_two_apps_where_the_runners_say() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        components = tomllib.load(f)["tool"]["flwr"]["app"]["components"]
    assert {ref.partition(":")[0] for ref in components.values()} == {"server.app", "client.shim"}
    assert all(ref.partition(":")[0] in RUNNERS for ref in components.values())


def test_the_import_reader_sees_lazy_relative_and_named_imports() -> None:
    source = (
        "from . import sibling\n"
        "from ..server import run\n"
        "def f():\n"
        "    import importlib\n"
        "    from server.app import make_server_app\n"
        "    return importlib.import_module('simulations.runner')\n"
    )
    names = {name for _, name in _imported_from(source, "client.predict", "probe.py")}
    assert {"client.predict.sibling", "client.server.run", "server.app",
            "server.app.make_server_app", "simulations.runner"} <= names
    assert any(_within(n, "server") for n in names) and not _within("serverless", "server")


# --- Flower is patched in one place ---------------------------------------------------------------

COMPAT = "common/flower_compat"


def _flower_names(tree: ast.AST) -> dict[str, str]:
    """{local name: Flower object} for the names a file binds by importing from flwr."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_forbidden(alias.name):  # `import flwr.x` binds flwr; `... as y`, flwr.x
                    bound[alias.asname or "flwr"] = alias.name if alias.asname else "flwr"
        elif isinstance(node, ast.ImportFrom) and not node.level:
            if not _is_forbidden(node.module or ""):
                continue
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}:{alias.name}"
        elif (  # name = importlib.import_module("flwr....")
            isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute)
            and node.value.func.attr == "import_module" and node.value.args
            and isinstance(node.value.args[0], ast.Constant)
            and _is_forbidden(str(node.value.args[0].value))
        ):
            names = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in names:
                if isinstance(target, ast.Name):
                    bound[target.id] = str(node.value.args[0].value)
    return bound


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _patches(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, what) for every write into a Flower module or class, and private overrides."""
    flower = _flower_names(tree)
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign | ast.Delete):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Attribute) and _root(target) in flower:
                yield node.lineno, f"writes {ast.unparse(target)}"
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr") and node.args
            and _root(node.args[0]) in flower
        ):
            yield node.lineno, f"{node.func.id}({ast.unparse(node.args[0])}, ...)"
        if isinstance(node, ast.ClassDef):
            bases = [_resolve(flower[b.id]) for b in node.bases
                     if isinstance(b, ast.Name) and b.id in flower]
            # its own methods, and those of mixins defined in the same file
            methods = [item for cls in (node, *(classes[b.id] for b in node.bases
                                                 if isinstance(b, ast.Name) and b.id in classes))
                       for item in cls.body if isinstance(item, ast.FunctionDef)]
            for item in methods:
                if (
                    item.name.startswith("_") and not item.name.startswith("__")
                    and any(hasattr(base, item.name) for base in bases)
                ):
                    yield item.lineno, f"overrides Flower's {node.name}.{item.name}"


def _resolve(ref: str) -> object:
    import importlib

    module, _, name = ref.partition(":")
    found = importlib.import_module(module)
    return getattr(found, name) if name else found


def test_only_the_compat_package_patches_flower() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in _package_files()
        if not path.relative_to(ROOT).as_posix().startswith(COMPAT + "/")
        for line, what in _patches(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    ]
    assert not found, (
        f"Flower's internals are patched outside {COMPAT}/: {found}. Move the patch there, with "
        "its version gate and evidence (see its __init__)"
    )


def test_the_patch_reader_sees_writes_setattr_and_private_overrides() -> None:
    source = (
        "import flwr.simulation.run_simulation as rs\n"
        "from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping as D\n"
        "from flwr.supernode.runtime import run_clientapp\n"
        "rs.InMemoryGrid = object\n"
        "setattr(run_clientapp, 'install_from_fab', print)\n"
        "class Mixin:\n"
        "    def _noisy_fraction(self, count, total): ...\n"
        "class Fix(Mixin, D):\n"
        "    def _geometric_update(self, fraction): ...\n"
        "    def _own_helper(self): ...\n"
        "local = object()\n"
        "local.x = 1\n"
        "sim: object = importlib.import_module('flwr.simulation.run_simulation')\n"
        "del sim.InMemoryGrid\n"
    )
    found = sorted(what for _, what in _patches(ast.parse(source)))
    assert found == [
        "overrides Flower's Fix._geometric_update", "overrides Flower's Fix._noisy_fraction",
        "setattr(run_clientapp, ...)", "writes rs.InMemoryGrid", "writes sim.InMemoryGrid",
    ]
