"""An output folder's manifest: --force deletes what medfed wrote and nothing of the user's."""

import json
from pathlib import Path

import pytest

from common.outputs import MANIFEST, note, owned, prepare

WRITES = ("results.json", "model.pt", "checkpoint")


def _run_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    prepare(folder, force=False, writes=WRITES)
    (folder / "results.json").write_text("{}")
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "state.json").write_text("{}")
    note(folder, folder / "results.json", folder / "checkpoint")
    return folder


def test_a_new_folder_gets_an_empty_manifest(tmp_path: Path) -> None:
    prepare(tmp_path / "new", force=False, writes=WRITES)
    assert json.loads((tmp_path / "new" / MANIFEST).read_text())["entries"] == []


def test_a_folder_holding_only_its_manifest_counts_as_empty(tmp_path: Path) -> None:
    prepare(tmp_path / "run", force=False, writes=WRITES)
    prepare(tmp_path / "run", force=False, writes=WRITES)  # a retry after a failed start


def test_force_deletes_only_what_medfed_wrote(tmp_path: Path) -> None:
    folder = _run_folder(tmp_path)
    (folder / "my-notes.txt").write_text("mine")
    (folder / "my-data").mkdir()
    with pytest.raises(FileExistsError, match="already holds medfed outputs"):
        prepare(folder, force=False, writes=WRITES)
    prepare(folder, force=True, writes=WRITES)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "my-data", "my-notes.txt"]
    assert owned(folder) == []


def test_force_refuses_to_overwrite_a_users_file_and_deletes_nothing(tmp_path: Path) -> None:
    folder = _run_folder(tmp_path)
    (folder / "model.pt").write_text("the user's own model")
    with pytest.raises(FileExistsError, match=r"model\.pt is not medfed's.*Nothing was deleted"):
        prepare(folder, force=True, writes=WRITES)
    assert (folder / "results.json").is_file() and (folder / "checkpoint").is_dir()
    assert (folder / "model.pt").read_text() == "the user's own model"


def test_a_folder_that_medfed_did_not_write_is_refused_even_with_force(tmp_path: Path) -> None:
    folder = tmp_path / "theirs"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "model.pt").write_text("x")
    with pytest.raises(FileExistsError, match="not a medfed output folder"):
        prepare(folder, force=True, writes=WRITES)
    assert (folder / "model.pt").is_file() and (folder / "checkpoint").is_dir()


def test_a_file_as_out_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match=f"--out {tmp_path / 'f'} is a file"):
        prepare(tmp_path / "f", force=True, writes=WRITES)


def test_a_manifest_never_reaches_outside_its_folder(tmp_path: Path) -> None:
    folder = _run_folder(tmp_path)
    (tmp_path / "outside.txt").write_text("keep")
    entries = ["../outside.txt", "/etc", "results.json", "checkpoint"]
    (folder / MANIFEST).write_text(json.dumps({"entries": entries}))
    prepare(folder, force=True, writes=WRITES)
    assert (tmp_path / "outside.txt").read_text() == "keep"
    assert not (folder / "results.json").exists()


def test_a_folder_from_before_manifests_counts_only_medfeds_names(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "results.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    prepare(folder, force=True, writes=WRITES, legacy=lambda f: (f / "results.json").is_file())
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "notes.txt"]


def test_provision_force_keeps_a_folder_that_holds_no_kits(tmp_path: Path) -> None:
    """`medfed provision --out data --force` must not delete a hospital's data/sites."""
    from server.provision import provision

    data = tmp_path / "data"
    (data / "sites" / "hospital-a").mkdir(parents=True)
    (data / "sites" / "hospital-a" / "labels.csv").write_text("path,label\n")
    with pytest.raises(FileExistsError, match="not a medfed output folder"):
        provision(data, project="p", server_hosts=["fl.example.org"], sites=["x"], force=True)
    assert (data / "sites" / "hospital-a" / "labels.csv").is_file()
    kits = tmp_path / "kits"
    provision(kits, project="p", server_hosts=["fl.example.org"], sites=["x"])
    (kits / "README.txt").write_text("the operator's notes")
    provision(kits, project="p", server_hosts=["fl.example.org"], sites=["y"], force=True)
    assert (kits / "README.txt").is_file() and (kits / "sites" / "y").is_dir()
    assert not (kits / "sites" / "x").exists()
