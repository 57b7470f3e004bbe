"""Getting a deployed run's results from the aggregator to the operator's machine.

A deployed ServerApp runs next to the SuperLink and writes its run folder there
(`STATE/runs/<run-id>`). Flower's open-source SuperLink has no artifact download (`flwr pull` is
an enterprise feature), but it does stream a run's log to the operator over the TLS Control API.
So at the end of a run the ServerApp logs each result file as numbered, checksummed base64 lines,
and `medfed run` rebuilds the files from the stream and verifies every checksum. The files stay
on the aggregator too, so nothing is lost when the operator is disconnected.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

# The aggregator's state folder, which `medfed server` (server.superlink) gives the ServerApps it
# runs: a deployed run writes its folder under STATE/runs/<run-id>.
STATE_ENV = "MEDFED_STATE_DIR"
MARK = "MEDFED-ARTIFACT"
DONE = "MEDFED-ARTIFACTS-DONE"
CHUNK = 3000  # base64 characters per log line
FILES = ("results.json", "model.pt", "metrics.png")


def publish(run_dir: Path, emit: Callable[[str], None], names: Iterable[str] = FILES) -> int:
    """Emit the run's result files as log lines; returns how many files were sent."""
    sent = 0
    for name in names:
        path = run_dir / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        text = base64.b64encode(data).decode()
        parts = max(1, -(-len(text) // CHUNK))
        header = {"name": name, "parts": parts, "sha256": hashlib.sha256(data).hexdigest()}
        for i in range(parts):
            emit(f"{MARK} {json.dumps({**header, 'part': i})} {text[i * CHUNK:(i + 1) * CHUNK]}")
        sent += 1
    emit(f"{DONE} {json.dumps({'files': sent})}")
    return sent


class ArtifactError(RuntimeError):
    """The result files in the log stream are incomplete or corrupt."""


@dataclass
class Collector:
    """Rebuilds the files from log lines, in any order, ignoring every other line."""

    parts: dict[str, dict[int, str]] = field(default_factory=dict)
    headers: dict[str, dict[str, object]] = field(default_factory=dict)
    done: bool = False

    def feed(self, line: str) -> bool:
        """Take one log line; True when it was part of the protocol."""
        if DONE in line:
            self.done = True
            return True
        at = line.find(MARK)
        if at < 0:
            return False
        rest = line[at + len(MARK):].strip()
        try:
            header_text, _, chunk = rest.rpartition(" ")
            header = json.loads(header_text)
            name, part = str(header["name"]), int(header["part"])
        except (ValueError, KeyError):
            return True  # a mangled line is caught by the completeness check
        if "/" in name or name.startswith("."):
            return True
        self.headers[name] = header
        self.parts.setdefault(name, {})[part] = chunk
        return True

    def write(self, out_dir: Path) -> list[Path]:
        """Verify and write every file; raises ArtifactError when one is incomplete."""
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name, header in self.headers.items():
            chunks = self.parts[name]
            parts = int(str(header["parts"]))
            missing = [i for i in range(parts) if i not in chunks]
            if missing:
                raise ArtifactError(f"{name}: {len(missing)} of {parts} parts missing")
            data = base64.b64decode("".join(chunks[i] for i in range(parts)))
            if hashlib.sha256(data).hexdigest() != header["sha256"]:
                raise ArtifactError(f"{name}: checksum mismatch")
            path = out_dir / name
            path.write_bytes(data)
            written.append(path)
        return written


def emit_to(logger: logging.Logger) -> Callable[[str], None]:
    """An emitter that writes protocol lines to a logger at INFO."""
    return lambda line: logger.info("%s", line)
