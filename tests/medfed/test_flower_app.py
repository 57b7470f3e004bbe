"""The repository as a Flower App: `flwr run .` in the installed environment, with the defaults
of `make demo`, saying where its results are."""

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig
from common.procs import descendants, flower_environment
from tests.medfed.helpers import free_port
from tests.simulations.conftest import write_easy_hospitals

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _app_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_the_app_defaults_are_the_demo_recipe() -> None:
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile[makefile.index("$(BIN)/medfed simulate"):]
    # as the app parses it: a batch size of 0 is the task's (64 for the demo's classifier)
    config = RunConfig.from_mapping(_app_config(), strict=False).to_mapping()
    for flag, key in [("--rounds", "rounds"), ("--batch-size", "batch-size"), ("--lr", "lr")]:
        value = re.search(rf"{flag} (\S+)", demo)
        assert value, flag
        assert float(value.group(1)) == float(config[key]), (flag, config[key])


def _processes_using(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_flwr_run_uses_the_installed_environment_and_says_where_results_are(
    tmp_path: Path,
) -> None:
    data = write_easy_hospitals(tmp_path / "data", [("a", 30, 0.5), ("b", 30, 0.5)], 20, seed=2)
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    env = {
        **flower_environment(), "FLWR_HOME": str(home), "NO_COLOR": "1",
        # what README's "As a Flower App" says: no per-run environment (uv, torch's CUDA build)
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    overrides = (
        f"rounds=1 local-steps=2 image-size=32 batch-size=16 sites-dir='{data / 'sites'}' "
        f"test-data='{data / 'test'}' out='{out}'"
    )
    started = time.monotonic()
    try:
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "--run-config", overrides, "--stream"],
            env=env, capture_output=True, text=True, timeout=600,
        )
    finally:
        # `flwr run` leaves its local SuperLink running, detached: ours is the one with our home
        for pid in _processes_using(str(home)):
            for child in [*descendants(pid), pid]:
                try:
                    os.kill(child, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert f"medfed results: {out}" in output, output[-3000:]
    assert "medfed round 1/1" in output
    assert (out / "results.json").is_file() and (out / "model.pt").is_file()
    assert not (home / "runtime-envs").exists()  # nothing was installed for the run
    assert "Installing application dependencies" not in output
    print(f"flwr run . (1 round, 2 sites): {time.monotonic() - started:.0f}s")
