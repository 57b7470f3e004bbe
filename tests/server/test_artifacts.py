import random
from pathlib import Path

import pytest

from server.artifacts import ArtifactError, Collector, publish


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"final": {"auc": 0.9}}')
    (run / "model.pt").write_bytes(random.Random(0).randbytes(50_000))
    return run


def test_files_survive_the_log_stream_in_any_order_among_other_lines(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    lines: list[str] = []
    assert publish(run, lines.append) == 2  # metrics.png absent: skipped
    noisy = [f"INFO :      {line}" for line in lines[:-1]]
    random.Random(1).shuffle(noisy)
    collector = Collector()
    for line in ["INFO : starting", *noisy, "some other log line", lines[-1]]:
        collector.feed(line)
    assert collector.done
    written = collector.write(tmp_path / "out")
    assert sorted(p.name for p in written) == ["model.pt", "results.json"]
    for path in written:
        assert path.read_bytes() == (run / path.name).read_bytes()


def test_a_missing_or_corrupt_part_is_an_error(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    lines: list[str] = []
    publish(run, lines.append, names=["model.pt"])
    missing = Collector()
    for line in lines[1:]:
        missing.feed(line)
    with pytest.raises(ArtifactError, match="parts missing"):
        missing.write(tmp_path / "a")
    corrupt = Collector()
    for line in lines:
        head, _, chunk = line.rpartition(" ")
        corrupt.feed(f"{head} {chunk[:-4]}AAAA" if '"part": 0' in head else line)
    with pytest.raises(ArtifactError, match="checksum"):
        corrupt.write(tmp_path / "b")


def test_names_cannot_escape_the_run_folder(tmp_path: Path) -> None:
    collector = Collector()
    collector.feed('MEDFED-ARTIFACT {"name": "../evil", "parts": 1, "sha256": "x", "part": 0} QQ==')
    assert collector.write(tmp_path / "out") == []
