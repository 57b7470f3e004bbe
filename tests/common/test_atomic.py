"""common.atomic: the target holds the old content or the new, durably, and nothing else is left.

The last test reads the source tree: a module that renames files into place on its own (an eighth
copy of this helper, without its fsyncs) fails it.
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from common.atomic import UMASK, atomic_open, write_bytes, write_text

ROOT = Path(__file__).resolve().parents[2]


def _leftovers(folder: Path, target: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p != target)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# --- old or new, never a mix ---------------------------------------------------------------------


def test_a_write_replaces_the_content_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "ledger.json"
    target.write_text("old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert _leftovers(tmp_path, target) == []


def test_a_serializer_that_fails_midway_leaves_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "privacy.json"
    write_text(target, json.dumps({"epsilon": 1.0}))

    class Unserializable:
        pass

    with pytest.raises(TypeError), atomic_open(target) as fh:
        # json.dump streams: "{"spent": 2.0, "bad": " is in the file when the error comes
        json.dump({"spent": 2.0, "bad": Unserializable()}, fh)
    assert json.loads(target.read_text()) == {"epsilon": 1.0}
    assert _leftovers(tmp_path, target) == []


def test_a_failed_first_write_leaves_no_file_at_all(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    with pytest.raises(RuntimeError), atomic_open(target, "wb") as fh:
        fh.write(b"x" * 100_000)
        raise RuntimeError("the process was told to stop")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_leaves_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_text(target, "new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path, target) == []


def test_an_error_names_the_file_asked_for_not_the_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "missing-folder" / "results.json"
    with pytest.raises(FileNotFoundError) as raised:
        write_text(target, "{}")
    assert raised.value.filename == str(target)


def test_the_temporary_file_is_hidden_and_beside_the_target(tmp_path: Path) -> None:
    target = tmp_path / "audit.head"
    with atomic_open(target) as fh:
        fh.write("x")
        during = _leftovers(tmp_path, target)
    assert len(during) == 1 and during[0].startswith(".audit.head-")
    # a dot-name keeps its own prefix: the run folder's manifest skips its temporary files so
    with atomic_open(tmp_path / ".medfed-run.json") as fh:
        names = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(names) == 1 and names[0].startswith(".medfed-run.json-")


# --- durable: the file and the rename are on disk ------------------------------------------------


def test_the_file_is_fsynced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, tuple[int, int]]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync", (info.st_dev, info.st_ino)))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        info = os.stat(src)
        events.append(("replace", (info.st_dev, info.st_ino)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "ledger.json"
    target.write_text("old")
    write_bytes(target, b"new")
    file, folder = target.stat(), tmp_path.stat()
    assert events == [
        ("fsync", (file.st_dev, file.st_ino)),  # the new content, under its temporary name
        ("replace", (file.st_dev, file.st_ino)),
        ("fsync", (folder.st_dev, folder.st_ino)),  # the rename itself
    ]


def test_an_exclusive_write_is_fsynced_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    key = tmp_path / "audit.key"
    write_bytes(key, b"secret", exclusive=True)
    assert {(key.stat().st_dev, key.stat().st_ino), (tmp_path.stat().st_dev,
                                                     tmp_path.stat().st_ino)} == set(synced)


def test_a_folder_that_cannot_be_fsynced_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")  # as some network file systems answer
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}"


def test_a_cache_write_skips_the_fsyncs_and_is_still_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    target = tmp_path / "entry.npz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target, "wb", durable=False) as fh:
        fh.write(b"half")
        raise RuntimeError("stopped")
    assert target.read_bytes() == b"old"
    with atomic_open(target, "wb", durable=False) as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new" and synced == []
    assert _leftovers(tmp_path, target) == []


# --- permissions ---------------------------------------------------------------------------------


def test_files_are_private_by_default_and_a_private_file_stays_private(tmp_path: Path) -> None:
    target = tmp_path / "audit.key"
    with _umask(0):  # the umask cannot widen it either
        write_bytes(target, b"one")
        assert _mode(target) == 0o600
        write_bytes(target, b"two")
    assert _mode(target) == 0o600 and target.read_bytes() == b"two"


@pytest.mark.parametrize("permissions", [0o644, 0o755])
def test_explicit_permissions_are_exact_whatever_the_umask(
    tmp_path: Path, permissions: int
) -> None:
    target = tmp_path / "medfed-kit.toml"
    with _umask(0o077):
        write_text(target, "kind = 'site'\n", permissions=permissions)
    assert _mode(target) == permissions


def test_umask_permissions_are_what_open_would_create(tmp_path: Path) -> None:
    with _umask(0o027):
        write_text(tmp_path / "report.html", "<html></html>", permissions=UMASK)
        (tmp_path / "plain.html").write_text("<html></html>")
    assert _mode(tmp_path / "report.html") == _mode(tmp_path / "plain.html") == 0o640


# --- made once ----------------------------------------------------------------------------------


def test_an_exclusive_write_never_replaces_an_existing_file(tmp_path: Path) -> None:
    key = tmp_path / "audit.key"
    write_bytes(key, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_bytes(key, b"second", exclusive=True)
    assert key.read_bytes() == b"first"
    assert _leftovers(tmp_path, key) == []


# --- several writers -----------------------------------------------------------------------------


def _contents(writers: int) -> list[bytes]:
    # large enough that a torn write would show: several pages, one byte repeated
    return [bytes([65 + i]) * 300_000 for i in range(writers)]


def test_threads_writing_one_target_leave_one_whole_content(tmp_path: Path) -> None:
    target = tmp_path / "hashes.json"
    contents = _contents(4)
    write_bytes(target, contents[0])
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(target.read_bytes())

    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(15):
                write_bytes(target, data)
        except BaseException as exc:  # a thread's exception is otherwise only printed
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents]
    watch = threading.Thread(target=reader)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    watch.join(timeout=120)
    assert errors == []
    assert seen and all(s in contents for s in seen)  # every read: one writer's whole content
    assert target.read_bytes() in contents
    assert _leftovers(tmp_path, target) == []


def test_processes_writing_one_target_leave_one_whole_content(tmp_path: Path) -> None:
    target = tmp_path / "ledger.json"
    write_bytes(target, b"start")
    script = (
        "import sys\nfrom common.atomic import write_bytes\n"
        "for _ in range(20):\n"
        "    write_bytes(sys.argv[1], sys.argv[2].encode() * 300_000)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(target), letter], env=env)
        for letter in "XY"
    ]
    seen: set[bytes] = set()
    while any(p.poll() is None for p in procs):
        seen.add(target.read_bytes())
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    allowed = {b"start", b"X" * 300_000, b"Y" * 300_000}
    assert seen <= allowed and target.read_bytes() in allowed - {b"start"}
    assert _leftovers(tmp_path, target) == []


# --- one copy of this helper in the tree ---------------------------------------------------------

# Renames that move something rather than write a file's content; each with why it stays.
RENAMES_ALLOWED = {
    ("server/record.py", "final.rename(old)"):
        "moves the previous checkpoint folder aside (a folder swap; its files are written "
        "through common.atomic)",
    ("server/record.py", "tmp.rename(final)"):
        "puts the new checkpoint folder in place (a folder swap, as above)",
    ("client/ledger.py", 'old.rename(old.with_name(old.name + ".migrated"))'):
        "marks an earlier medfed's ledger as migrated; it keeps its content",
}
# the calls that write a temporary file or rename one into place
_FUNCTIONS = {("os", "replace"), ("os", "rename"), ("os", "link"), ("tempfile", "mkstemp"),
              ("tempfile", "NamedTemporaryFile")}
_SKIP_DIRS = {"tests", ".venv", "venv", "build", "dist", "node_modules"}


def _sources() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[:2] == ("bench", "out"):  # what `make bench` writes
            continue
        if not (_SKIP_DIRS & set(parts) or any(p.startswith(".") for p in parts)):
            yield path


def _renames(tree: ast.AST, source: str) -> Iterator[str]:
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            # Path.replace/rename take one path; str.replace takes two, a dataclass's keywords
            path_method = (func.attr in ("replace", "rename") and len(node.args) == 1
                           and not node.keywords)
            if (owner, func.attr) in _FUNCTIONS or path_method:
                yield ast.get_source_segment(source, node) or func.attr
        elif isinstance(func, ast.Name) and func.id in {"mkstemp", "NamedTemporaryFile"}:
            yield ast.get_source_segment(source, node) or func.id


def test_no_module_but_common_atomic_renames_a_file_into_place() -> None:
    found: set[tuple[str, str]] = set()
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "common/atomic.py":
            continue
        source = path.read_text(encoding="utf-8")
        found |= {(rel, call) for call in _renames(ast.parse(source, rel), source)}
    unexplained = sorted(found - set(RENAMES_ALLOWED))
    assert not unexplained, (
        "write these through common.atomic (write_bytes, write_text or atomic_open: fsync "
        "and cleanup included), or, for a rename that is not a write, add it with its reason "
        f"to RENAMES_ALLOWED: {unexplained}"
    )
    stale = sorted(set(RENAMES_ALLOWED) - found)
    assert not stale, f"RENAMES_ALLOWED names calls that are gone; remove them: {stale}"


def test_the_source_check_finds_a_copy_of_the_helper() -> None:
    copy = (
        "import os, tempfile\n"
        "fd, tmp = tempfile.mkstemp(dir=folder)\n"
        "os.replace(tmp, path)\n"
        "Path(tmp).replace(path)\n"
        "text = name.replace('a', 'b')\n"
        "cfg = cfg.replace(rounds=2)\n"
    )
    assert sorted(_renames(ast.parse(copy), copy)) == [
        "Path(tmp).replace(path)", "os.replace(tmp, path)", "tempfile.mkstemp(dir=folder)",
    ]

