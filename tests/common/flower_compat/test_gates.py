"""Every patch of Flower's internals is gated, and its gate names what to re-check."""

import importlib
import pkgutil
import re
from pathlib import Path

import flwr
import pytest

import common.flower_compat as compat
from common.flower_compat import CHECKED_VERSIONS, FlowerVersionError, Gate

ROOT = Path(__file__).resolve().parents[3]
SITE_PACKAGES = Path(flwr.__file__).resolve().parent
MODULES = sorted(m.name for m in pkgutil.iter_modules(compat.__path__))


def test_the_installed_flower_is_a_checked_one() -> None:
    assert flwr.__version__ in CHECKED_VERSIONS  # pyproject pins flwr to one of them


@pytest.mark.parametrize("name", MODULES)
def test_each_patch_has_a_gate_naming_real_flower_code_and_a_real_test(name: str) -> None:
    gate = importlib.import_module(f"common.flower_compat.{name}").GATE
    assert isinstance(gate, Gate)
    assert gate.holds()
    for path in re.findall(r"flwr/[\w/]+\.py", gate.flower_code):
        assert (SITE_PACKAGES.parent / path).is_file(), f"{name}: {path} is not in flwr"
    assert (ROOT / gate.test).is_file(), f"{name}: its test {gate.test} does not exist"
    assert name in (compat.__doc__ or ""), f"{name} is missing from the package's table"


def test_a_gate_that_does_not_match_names_the_version_the_code_and_the_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate(patch="the thing", flower_code="flwr/x.py (f)", test="tests/t.py",
                versions=frozenset({"1.41.0"}))
    monkeypatch.setattr(flwr, "__version__", "1.43.0")
    assert not gate.holds()
    with pytest.raises(FlowerVersionError) as refused:
        gate.require()
    assert str(refused.value) == (
        "Flower 1.43.0 is installed, but the thing was checked only against Flower 1.41.0. "
        "Install one of those (pyproject.toml pins flwr), or re-read flwr/x.py (f) in the new "
        "release, run `pytest tests/t.py`, and add the version to the gate in "
        "common/flower_compat/ when it passes"
    )
