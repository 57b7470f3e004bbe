"""The operator's side of a deployed federation: submit, follow, list and stop runs.

Everything goes through Flower's own CLI (`flwr run`, `flwr ls`, `flwr stop`) over the TLS
Control API, configured from the operator kit in a private, temporary Flower home, so the
operator's own `~/.flwr` is neither read nor changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.apps import build_app_bundle
from common.kit import KitError, OperatorKit, check_private
from common.procs import flower_environment, flower_executable
from common.runsign import RunSignatureError, load_private_key, sign_run
from server import artifacts

CONNECTION = "medfed"
STARTED = re.compile(r"Successfully started run (\d+)")
PROGRESS_MARK = "medfed round"
# Colour codes Flower's logger adds; progress lines are shown without them.
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class OperatorError(RuntimeError):
    """The aggregator could not be reached or refused the request; the message says why."""


def find_app_dir(given: Path | None = None) -> Path:
    """The medfed Flower App (a folder whose pyproject.toml has [tool.flwr.app]).

    Looked for in `given`, else $MEDFED_APP_DIR (the image sets it), this installation's source
    folder, and the working directory.
    """
    env = os.environ.get("MEDFED_APP_DIR")
    fallback = [Path(env)] if env else []
    candidates = [given] if given else [*fallback, Path(__file__).resolve().parents[1], Path.cwd()]
    for folder in candidates:
        if folder and (folder / "pyproject.toml").is_file():
            if "[tool.flwr.app]" in (folder / "pyproject.toml").read_text():
                return folder
    where = given or candidates[0]
    raise FileNotFoundError(
        f"{where}: not a Flower App (no pyproject.toml with [tool.flwr.app]); pass --app with "
        "the medfed source folder (a clone of the repository, or /opt/medfed/app in the image)"
    )


@contextmanager
def flower_home(kit: OperatorKit) -> Iterator[dict[str, str]]:
    """Environment for `flwr` with one connection, `medfed`, from the operator kit."""
    home = Path(tempfile.mkdtemp(prefix="medfed-flwr-"))
    try:
        config = {
            "superlink": {
                "default": CONNECTION,
                CONNECTION: {
                    "address": kit.superlink,
                    "root-certificates": str(kit.ca_cert.resolve()),
                },
            }
        }
        (home / "config.toml").write_text(tomli_w.dumps(config))
        env = flower_environment()
        env["FLWR_HOME"] = str(home)
        env["NO_COLOR"] = "1"
        yield env
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _flwr(args: list[str], env: Mapping[str, str], timeout: float = 120) -> str:
    proc = subprocess.run(  # noqa: S603 - our own argv, no shell
        [flower_executable("flwr"), *args], env=dict(env), capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        raise OperatorError(_explain(proc.stdout + proc.stderr))
    return proc.stdout


def _explain(output: str) -> str:
    text = ANSI.sub("", output).strip()
    lowered = text.lower()
    if "certificate verify failed" in lowered or "certificate_verify_failed" in lowered:
        return (
            "the aggregator's certificate is not signed by the operator kit's CA; the kit "
            "belongs to another provisioning"
        )
    if "connect" in lowered and ("refused" in lowered or "error" in lowered):
        return f"cannot reach the aggregator: {text.splitlines()[-1] if text else 'no answer'}"
    return text.splitlines()[-1] if text else "flwr failed without a message"


def _json_payload(output: str) -> dict[str, Any]:
    start = output.find("{")
    if start < 0:
        raise OperatorError(f"unexpected answer from flwr: {output.strip()[:200]}")
    payload = json.loads(output[start:])
    if not payload.get("success", True):
        raise OperatorError(str(payload.get("error-message", payload)))
    return dict(payload)


def list_runs(kit: OperatorKit) -> list[dict[str, Any]]:
    """Every run the aggregator knows, as Flower's `flwr ls --format json` lists them."""
    with flower_home(kit) as env:
        payload = _json_payload(_flwr(["ls", CONNECTION, "--format", "json"], env))
    return list(payload.get("runs", []))


def run_status(kit: OperatorKit, run_id: int) -> dict[str, Any]:
    """One run as `flwr ls --run-id` shows it."""
    with flower_home(kit) as env:
        payload = _json_payload(
            _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env)
        )
    runs = payload.get("runs", [])
    if not runs:
        raise OperatorError(f"the aggregator knows no run {run_id}")
    return dict(runs[0])


def stop_run(kit: OperatorKit, run_id: int) -> None:
    """Stop a run on the aggregator."""
    with flower_home(kit) as env:
        _flwr(["stop", str(run_id), CONNECTION], env)


def sign_overrides(
    kit: OperatorKit, overrides: Mapping[str, Any], *, fab_sha256: str
) -> dict[str, Any]:
    """The overrides signed with the operator kit's key (common.runsign), as sites require."""
    if not kit.key.is_file():
        raise OperatorError(
            f"{kit.key}: the operator kit has no run-signing key, and sites refuse unsigned "
            "runs; use the operator kit `medfed provision` wrote"
        )
    try:
        check_private(kit.key)
        key = load_private_key(kit.key.read_bytes(), where=str(kit.key))
        return sign_run(overrides, fab_sha256=fab_sha256, operator=kit.name, private_key=key)
    except (KitError, RunSignatureError) as exc:
        raise OperatorError(str(exc)) from None


@dataclass
class Submission:
    """What `medfed run` learnt from following a run to its end."""

    run_id: int | None
    status: str
    files: list[Path]


def submit(
    kit: OperatorKit,
    *,
    app_dir: Path,
    overrides: Mapping[str, Any],
    out_dir: Path,
    show: Callable[[str], None],
    verbose: bool = False,
    on_started: Callable[[int], None] | None = None,
) -> Submission:
    """Submit the app with these run-config overrides, follow its log, write its results.

    `show` receives the lines worth showing (progress, errors; all with `verbose`), first the
    app bundle's FAB hash: a site runs the app only once its hospital approved that hash.
    """
    try:
        bundle = build_app_bundle(app_dir)[1]
    except (OSError, ValueError) as exc:
        raise OperatorError(f"{app_dir}: cannot build the Flower App bundle: {exc}") from None
    show(
        f"app {bundle.label}, FAB sha256 {bundle.sha256}: sites run it only once their "
        f"hospital approved it (`medfed site approve --kit KIT --fab-hash {bundle.sha256}`)"
    )
    signed = sign_overrides(kit, overrides, fab_sha256=bundle.sha256)
    collector = artifacts.Collector()
    run_id: int | None = None
    with flower_home(kit) as env, tempfile.TemporaryDirectory() as tmp:
        overrides_file = Path(tmp) / "run-config.toml"
        overrides_file.write_text(tomli_w.dumps(signed))
        argv = [
            flower_executable("flwr"), "run", str(app_dir), CONNECTION,
            "--run-config", str(overrides_file), "--stream",
        ]
        proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        tail: list[str] = []
        last_progress = ""
        try:
            for raw in proc.stdout:
                line = ANSI.sub("", raw.rstrip("\n"))
                if collector.feed(line):
                    continue
                if PROGRESS_MARK in line:
                    # the ServerApp's log reaches the stream twice (Flower's handler and the
                    # root logger's); show each progress line once
                    progress = line[line.index(PROGRESS_MARK):]
                    if progress == last_progress:
                        continue
                    last_progress = progress
                tail = (tail + [line])[-20:]
                started = STARTED.search(line)
                if started and run_id is None:
                    run_id = int(started.group(1))
                    if on_started:
                        on_started(run_id)
                if verbose or PROGRESS_MARK in line or "ERROR" in line or started:
                    show(line)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
    if run_id is None:
        raise OperatorError(_explain("\n".join(tail)) if tail else f"flwr exited with {code}")
    status = run_status(kit, run_id).get("status", "unknown")
    files = collector.write(out_dir) if collector.done else []
    return Submission(run_id, str(status), files)
