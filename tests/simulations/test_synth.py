"""Tests of the synthetic multi-site data: formats, geometry, determinism, site differences."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from simulations import phantom, synth
from simulations.synth import sites as synth_sites
from simulations.synth import synthesize
from simulations.synth import writer as synth_writer

SITES = 5
PER_SITE = 12
TEST_IMAGES = 12


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _folders(out: Path) -> list[Path]:
    return sorted((out / "sites").iterdir()) + [out / "test"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "demo"
    summary = synthesize(
        out, sites=SITES, images_per_site=PER_SITE, seed=3, test_images=TEST_IMAGES
    )
    return out, summary


@pytest.fixture(scope="module")
def headers(data: tuple[Path, synth.SynthSummary]) -> dict[Path, pydicom.Dataset]:
    out, _ = data
    return {
        folder / row["path"]: pydicom.dcmread(folder / row["path"])
        for folder in _folders(out)
        for row in _rows(folder)
    }


def test_layout_labels_and_summary(data: tuple[Path, synth.SynthSummary]) -> None:
    out, summary = data
    assert summary.sites == [f"hospital-{i:02d}" for i in range(1, SITES + 1)]
    assert [p.name for p in sorted((out / "sites").iterdir())] == summary.sites
    for site in summary.sites:
        rows = _rows(out / "sites" / site)
        assert list(rows[0]) == ["path", "label", "mask", "split"]
        assert len(rows) == summary.images[site]
        assert {r["split"] for r in rows} <= {"train", "val", "test"}
        assert sum(r["split"] == "train" for r in rows) == pytest.approx(0.7 * len(rows), abs=2)
        positives = sum(r["label"] == "1" for r in rows) / len(rows)
        assert positives == pytest.approx(summary.positives[site], abs=0.5 / len(rows) + 1e-9)
    test_rows = _rows(out / "test")
    assert len(test_rows) == summary.test_images == TEST_IMAGES
    assert {r["split"] for r in test_rows} == {"test"}
    assert sum(r["label"] == "1" for r in test_rows) == TEST_IMAGES // 2
    for folder in _folders(out):
        for row in _rows(folder):
            assert row["label"] in {"0", "1"}
            assert (folder / row["path"]).is_file() and (folder / row["mask"]).is_file()


def test_every_dicom_decodes_with_site_specific_encodings(
    headers: dict[Path, pydicom.Dataset],
) -> None:
    syntaxes, photometric, modalities = set(), set(), set()
    for path, ds in headers.items():
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns), path
        assert 96 <= ds.Rows <= 192 and 96 <= ds.Columns <= 192
        assert ds.BitsAllocated == 16 and ds.HighBit == ds.BitsStored - 1
        assert pixels.dtype == (np.int16 if ds.PixelRepresentation else np.uint16)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        photometric.add(ds.PhotometricInterpretation)
        modalities.add(ds.Modality)
        assert ds.SOPClassUID == synth_writer._SOP_CLASS[ds.Modality]
        if ds.Modality == "CT":
            assert ds.SOPClassUID == CTImageStorage
            assert (ds.RescaleIntercept, ds.RescaleSlope, ds.PixelRepresentation) == (-1024, 1, 1)
            # The stored lung window must show lung (about -860 HU) below the window centre.
            assert float(ds.WindowCenter) - float(ds.WindowWidth) / 2 < -860 < ds.WindowCenter
        if ds.Modality in {"CT", "MR"}:
            assert len(ds.ImagePositionPatient) == 3 and len(ds.ImageOrientationPatient) == 6
    assert {ExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless} <= syntaxes
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert modalities == {"CT", "MR", "DX", "CR"}
    uids = [ds.SOPInstanceUID for ds in headers.values()]
    assert len(set(uids)) == len(uids)


def test_masks_match_image_geometry_and_labels(
    data: tuple[Path, synth.SynthSummary], headers: dict[Path, pydicom.Dataset]
) -> None:
    out, _ = data
    for folder in _folders(out):
        for row in _rows(folder):
            ds = headers[folder / row["path"]]
            mask = nib.load(folder / row["mask"])
            assert mask.shape == (ds.Rows, ds.Columns)
            assert mask.header.get_zooms() == pytest.approx([float(s) for s in ds.PixelSpacing])
            values = np.asarray(mask.dataobj)
            assert set(np.unique(values)) <= {0, 1}
            assert values.any() == (row["label"] == "1"), folder / row["mask"]


def test_lesion_mask_marks_the_lesion_pixels() -> None:
    # Noise- and blur-free imaging: inside the mask the CT value must be the lesion's.
    rng = np.random.default_rng(0)
    grid = phantom.Grid(160, 160, (2.5, 2.5))
    scanner = phantom.Scanner("axial", grid, synth_sites._CT_TISSUES, 1e-3, 0.0, 0.0, 0.0)
    for _ in range(5):
        ph = phantom.sample_phantom(rng, "axial", lesion=True, min_radius=4.0)
        image, mask = phantom.acquire(ph, scanner, rng)
        assert ph.lesion is not None and mask.sum() >= 1
        lung, lesion = synth_sites._CT_TISSUES.lung, synth_sites._CT_TISSUES.lesion
        expected = lung + ph.lesion.contrast * (lesion - lung)
        core = mask & (np.abs(image - expected) < 1.0)
        # Only the partial-volume rim of the mask may deviate from the lesion value.
        assert core.sum() >= 0.5 * mask.sum()
        assert np.median(image[mask]) == pytest.approx(expected, abs=1.0)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"sites": 4, "images_per_site": 10, "test_images": 10}
    a = synthesize(tmp_path / "a", seed=7, **kwargs).out
    b = synthesize(tmp_path / "b", seed=7, **kwargs).out
    c = synthesize(tmp_path / "c", seed=8, **kwargs).out
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    first = "sites/hospital-01/images/img_0001.dcm"
    assert not np.array_equal(
        pydicom.dcmread(a / first).pixel_array, pydicom.dcmread(c / first).pixel_array
    )
    assert (a / "identifiers.json").read_text() != (c / "identifiers.json").read_text()


def test_sites_differ_in_case_mix_size_and_scanner(
    data: tuple[Path, synth.SynthSummary], headers: dict[Path, pydicom.Dataset]
) -> None:
    out, summary = data
    assert len(set(summary.positives.values())) == SITES
    assert all(0.15 <= p <= 0.6 for p in summary.positives.values())
    big = synth_sites._site_profiles(SITES, 200, seed=3)
    assert len({p.n_images for p in big}) == SITES
    assert all(100 <= p.n_images <= 300 for p in big)
    styles = set()
    for site in summary.sites:
        ds = next(h for path, h in headers.items() if path.parent.parent.name == site)
        styles.add((ds.Modality, ds.Rows, ds.Columns, ds.InstitutionName))
    assert len(styles) == SITES


def test_identifiers_json_lists_the_header_identifiers(
    data: tuple[Path, synth.SynthSummary], headers: dict[Path, pydicom.Dataset]
) -> None:
    out, summary = data
    ids = json.loads((out / "identifiers.json").read_text())
    assert set(ids) == set(summary.sites) | {"test"}
    names = {n for folder in ids.values() for n in folder["patient_names"]}
    patient_ids = [i for folder in ids.values() for i in folder["patient_ids"]]
    assert len(patient_ids) == len(set(patient_ids)) == len(headers)
    for ds in headers.values():
        assert str(ds.PatientName) in names and "^" in str(ds.PatientName)
        assert ds.PatientID in patient_ids
    site_1 = ids["hospital-01"]["patient_ids"]
    assert site_1[0] == "MF0100001"


def test_refuses_a_non_empty_folder_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    synthesize(out, sites=3, images_per_site=10, test_images=10)
    with pytest.raises(FileExistsError, match="--force"):
        synthesize(out, sites=2, images_per_site=10, test_images=10)
    (out / "notes.txt").write_text("kept")
    summary = synthesize(out, sites=2, images_per_site=10, test_images=10, overwrite=True)
    assert sorted(p.name for p in (out / "sites").iterdir()) == summary.sites
    assert (out / "notes.txt").read_text() == "kept"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        synthesize(tmp_path / "file", sites=1, images_per_site=10, overwrite=True)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"sites": 0}, "--sites must be >= 1, got 0"),
        ({"sites": 2, "images_per_site": 9}, "--images-per-site must be >= 10"),
        ({"sites": 2, "test_images": 3}, "--test-images must be >= 10"),
        ({"sites": 2, "seed": -1}, "--seed must be >= 0"),
    ],
)
def test_bad_arguments_name_the_flag(tmp_path: Path, kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        synthesize(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_codec_falls_back_to_uncompressed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class _Missing:
        is_available = False

    monkeypatch.setattr(synth_sites, "get_encoder", lambda uid: _Missing())
    out = synthesize(tmp_path / "out", sites=3, images_per_site=10, test_images=10).out
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


@pytest.mark.slow
def test_default_task_is_learnable_but_not_trivial(tmp_path: Path) -> None:
    # The issue's calibration target: a CNN trained centrally on the pooled sites reaches a
    # held-out AUC between 0.85 and 0.97 (the subtle lesions keep it below 1).
    from common.config import RunConfig
    from simulations.central import train_central

    data = synthesize(tmp_path / "data", sites=4, images_per_site=160, seed=0).out
    cfg = RunConfig.from_mapping(
        {
            "sites-dir": str(data / "sites"),
            "test-data": str(data / "test"),
            "out": str(tmp_path / "central"),
            "device": "cpu",
        }
    )
    result = train_central(cfg, epochs=15)
    aucs = [epoch["auc"] for epoch in result["epochs"]]
    assert 0.85 <= result["final"]["auc"] <= 0.97, aucs
    # Learnable, not a lucky last epoch: the first epoch is far below the plateau.
    assert aucs[0] < result["final"]["auc"] - 0.1, aucs


def test_labelled_fraction_blanks_training_labels_only_and_keeps_the_images(
    tmp_path: Path,
) -> None:
    kwargs = {"sites": 2, "images_per_site": 40, "test_images": 10, "seed": 5}
    full = synthesize(tmp_path / "full", **kwargs).out
    part = synthesize(tmp_path / "part", labelled_fraction=0.25, **kwargs).out
    for folder_full, folder_part in zip(_folders(full), _folders(part), strict=True):
        rows_full, rows_part = _rows(folder_full), _rows(folder_part)
        assert [r["path"] for r in rows_full] == [r["path"] for r in rows_part]
        for a, b in zip(rows_full, rows_part, strict=True):
            assert (folder_full / a["path"]).read_bytes() == (folder_part / b["path"]).read_bytes()
            assert b["label"] in ("", a["label"])
            if b["split"] != "train":
                assert b["label"] == a["label"]
    train = [r for f in _folders(part)[:-1] for r in _rows(f) if r["split"] == "train"]
    kept = sum(r["label"] != "" for r in train) / len(train)
    assert 0.1 < kept < 0.45


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_labelled_fraction_out_of_range_names_the_flag(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(ValueError, match="--labelled-fraction"):
        synthesize(tmp_path / "x", sites=1, labelled_fraction=fraction)
