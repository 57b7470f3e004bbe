"""The operator's side of a deployed federation: submit, follow, list and stop runs.

Everything goes through Flower's own CLI (`flwr run`, `flwr ls`, `flwr stop`) over the TLS
Control API, configured from the operator kit in a private, temporary Flower home, so the
operator's own `~/.flwr` is neither read nor changed. The CLI runs as
`python -m server.flwr_operator`, which presents the kit's operator certificate: the
aggregator's gateway serves the Control API to nobody else. The certificate is checked here
first (readable, matches its key, issued by the kit's CA, in its validity period), so a wrong
kit is named before anything is sent.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from common.apps import build_app_bundle
from common.certs import OPERATOR_OU
from common.kit import KitError, check_private
from common.operator_kit import OperatorKit
from common.procs import flower_environment
from common.runsign import RunSignatureError, load_private_key, sign_run
from server import artifacts
from server.flwr_operator import CERT_ENV, KEY_ENV
from server.waiting import GAVE_UP_MARK, WAITING_MARK

CONNECTION = "medfed"
STARTED = re.compile(r"Successfully started run (\d+)")
PROGRESS_MARK = "medfed round"
# the ServerApp's lines `medfed run` shows: rounds, and waiting for sites (server.waiting)
SHOWN_MARKS = (PROGRESS_MARK, WAITING_MARK, GAVE_UP_MARK)
# Colour codes Flower's logger adds; progress lines are shown without them.
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class OperatorError(RuntimeError):
    """The aggregator could not be reached or refused the request; the message says why.

    `refused`: the aggregator turned the operator's certificate away (exit 3, not 1).
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def check_credentials(kit: OperatorKit) -> x509.Certificate:
    """The kit's operator certificate, checked locally; raises KitError naming kit and fix."""
    fix = (
        f"ask the federation's operator for a new operator kit (`medfed provision add-operator "
        f"NAME --kits KITS`) and pass it as --kit (this one: {kit.path})"
    )
    try:
        cert = x509.load_pem_x509_certificate(kit.cert.read_bytes())
        ca = x509.load_pem_x509_certificate(kit.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(kit.key.read_bytes(), password=None)
    except OSError as exc:
        raise KitError(f"{exc.filename}: cannot read ({exc.strerror}); {fix}") from None
    except (ValueError, TypeError) as exc:
        raise KitError(
            f"{kit.path}: operator.crt or operator.key is damaged ({exc}); {fix}"
        ) from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise KitError(f"{kit.key}: not the key of {kit.cert}; {fix}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise KitError(f"{kit.cert}: not issued by the kit's CA ({kit.ca_cert}); {fix}") from None
    unit = x509.NameOID.ORGANIZATIONAL_UNIT_NAME
    if OPERATOR_OU not in [a.value for a in cert.subject.get_attributes_for_oid(unit)]:
        raise KitError(f"{kit.cert}: not an operator certificate (no OU={OPERATOR_OU}); {fix}")
    now = dt.datetime.now(dt.UTC)
    if now > cert.not_valid_after_utc:
        raise KitError(
            f"{kit.cert}: operator certificate expired on "
            f"{cert.not_valid_after_utc:%Y-%m-%d}; {fix}"
        )
    if now < cert.not_valid_before_utc:
        raise KitError(
            f"{kit.cert}: operator certificate not valid before "
            f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)"
        )
    return cert


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
    check_credentials(kit)
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
        env[CERT_ENV] = str(kit.cert.resolve())
        env[KEY_ENV] = str(kit.key.resolve())
        yield env
    finally:
        shutil.rmtree(home, ignore_errors=True)


def flwr_argv(*args: str) -> list[str]:
    """Flower's CLI, presenting the operator certificate (server.flwr_operator)."""
    return [sys.executable, "-m", "server.flwr_operator", *args]


def _flwr(args: list[str], env: Mapping[str, str], kit: OperatorKit, timeout: float = 120) -> str:
    proc = subprocess.run(  # noqa: S603 - our own argv, no shell
        flwr_argv(*args), env=dict(env), capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        raise _error(proc.stdout + proc.stderr, kit)
    return proc.stdout


def _error(output: str, kit: OperatorKit) -> OperatorError:
    text = ANSI.sub("", output).strip()
    lowered = text.lower()
    fix = f"`medfed provision add-operator NAME --kits KITS` issues a new one (kit: {kit.path})"
    if "403 forbidden" in lowered:
        return OperatorError(
            f"the aggregator refused the Control API call: {kit.cert} is not accepted as an "
            f"operator certificate of this federation; {fix}", refused=True,
        )
    if "400 bad request" in lowered:
        return OperatorError(
            f"the aggregator rejected the operator certificate {kit.cert} (revoked, expired, or "
            f"issued by another federation's CA); {fix}", refused=True,
        )
    if "certificate verify failed" in lowered or "certificate_verify_failed" in lowered:
        return OperatorError(
            "the aggregator's certificate is not signed by the operator kit's CA; the kit "
            "belongs to another provisioning"
        )
    if "connect" in lowered and ("refused" in lowered or "error" in lowered):
        last = _last_message(text) or "no answer"
        return OperatorError(f"cannot reach the aggregator: {last}")
    return OperatorError(_last_message(text) or "flwr failed without a message")


def _last_message(text: str) -> str:
    """The last thing `flwr` said: the inside of its last error box, else its last line.

    typer draws a ClickException as "╭─ Error ─╮ / │ text │ / ╰──╯", wrapped at the terminal's
    width; the box's bottom border is the last line, and says nothing.
    """
    lines = text.splitlines()
    top = max((i for i, line in enumerate(lines) if line.lstrip().startswith("╭")), default=None)
    if top is None:
        return lines[-1].strip() if lines else ""
    inside = []
    for line in lines[top + 1:]:
        if line.lstrip().startswith("╰"):
            break
        inside.append(line.strip().strip("│").strip())
    return " ".join(part for part in inside if part)


def _json_payload(output: str, kit: OperatorKit) -> dict[str, Any]:
    start = output.find("{")
    if start < 0:
        raise OperatorError(f"unexpected answer from flwr: {output.strip()[:200]}")
    payload = json.loads(output[start:])
    if not payload.get("success", True):
        raise _error(str(payload.get("error-message", payload)), kit)
    return dict(payload)


def list_runs(kit: OperatorKit) -> list[dict[str, Any]]:
    """Every run the aggregator knows, as Flower's `flwr ls --format json` lists them."""
    with flower_home(kit) as env:
        payload = _json_payload(_flwr(["ls", CONNECTION, "--format", "json"], env, kit), kit)
    return list(payload.get("runs", []))


def run_status(kit: OperatorKit, run_id: int) -> dict[str, Any]:
    """One run as `flwr ls --run-id` shows it."""
    with flower_home(kit) as env:
        payload = _json_payload(
            _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env, kit), kit
        )
    runs = payload.get("runs", [])
    if not runs:
        raise OperatorError(f"the aggregator knows no run {run_id}")
    return dict(runs[0])


def stop_run(kit: OperatorKit, run_id: int) -> None:
    """Stop a run on the aggregator."""
    with flower_home(kit) as env:
        _flwr(["stop", str(run_id), CONNECTION], env, kit)


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
    # why the aggregator ended the run, when it said so (e.g. its sites never connected)
    reason: str = ""


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
        argv = flwr_argv(
            "run", str(app_dir), CONNECTION, "--run-config", str(overrides_file), "--stream",
        )
        proc = subprocess.Popen(  # noqa: S603 - our own argv, no shell
            argv, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        tail: list[str] = []
        last_progress = ""
        reason = ""
        try:
            for raw in proc.stdout:
                line = ANSI.sub("", raw.rstrip("\n"))
                if collector.feed(line):
                    continue
                mark = next((m for m in SHOWN_MARKS if m in line), None)
                if mark is not None:
                    # the ServerApp's log reaches the stream twice (Flower's handler and the
                    # root logger's); show each progress line once
                    progress = line[line.index(mark):]
                    if progress == last_progress:
                        continue
                    last_progress = progress
                    if mark == GAVE_UP_MARK:
                        reason = progress[len(GAVE_UP_MARK) + 2:]
                tail = (tail + [line])[-20:]
                started = STARTED.search(line)
                if started and run_id is None:
                    run_id = int(started.group(1))
                    if on_started:
                        on_started(run_id)
                if mark is not None and not verbose:
                    # one form, stamped on arrival: the stream carries the line with and
                    # without Flower's timestamp, whichever comes first
                    show(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {progress}")
                elif verbose or "ERROR" in line or started:
                    show(line)
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
    if run_id is None:
        raise _error("\n".join(tail), kit) if tail else OperatorError(f"flwr exited with {code}")
    status = run_status(kit, run_id).get("status", "unknown")
    files = collector.write(out_dir) if collector.done else []
    return Submission(run_id, str(status), files, reason)
