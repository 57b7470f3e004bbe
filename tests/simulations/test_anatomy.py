"""Anatomical label maps of `medfed synth --masks anatomy`, in 2D and as volumes (--dims 3).

The masks are checked through the files (NIfTI and DICOM read back with nibabel, pydicom and
medfed's own readers), against the properties a segmentation task needs: every structure of the
one label table where the view shows it, at a plausible size and place; the lesion label only in
lesion-positive images and inside a lung; image boundaries that follow the masks; volumes whose
masks lie on their series; the same files for the same seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from common.data.errors import ImageError
from common.data.image import decode_mask, read_raw
from common.data.preprocess import Preprocess
from medfed.cli import EXIT_BAD_INPUT, app
from simulations import anatomy, film, torso
from simulations.anatomy import LABELS, organ_tissues
from simulations.phantom import Grid
from simulations.synth import synthesize
from simulations.synth.sites import _CT_TISSUES, _XR_TISSUES

runner = CliRunner()
BODY, RIGHT, LEFT, HEART, LIVER, LESION = 1, 2, 3, 4, 5, 6
ANATOMY_2D: dict[str, Any] = {
    "sites": 5, "images_per_site": 12, "seed": 3, "test_images": 12, "masks": "anatomy",
}
VOLUMES: dict[str, Any] = {
    "sites": 2, "images_per_site": 10, "seed": 4, "test_images": 10, "masks": "anatomy",
    "dims": 3,
}


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _folders(out: Path) -> list[Path]:
    return sorted((out / "sites").iterdir()) + [out / "test"]


def _digest(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five sites (CT, MR, DX, CT, CR) of 2D images with anatomical label maps."""
    out = tmp_path_factory.mktemp("anatomy") / "2d"
    synthesize(out, **ANATOMY_2D)
    return out


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("anatomy") / "3d"
    synthesize(out, **VOLUMES)
    return out


@pytest.fixture(scope="module")
def cases(images: Path) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """(view, label, image in modality units, label map) of every 2D image, via the readers."""
    out = []
    for folder in _folders(images):
        for row in _rows(folder):
            raw = read_raw(folder / row["path"])
            mask = np.asarray(nib.load(folder / row["mask"]).dataobj)
            view = "frontal" if raw.meta.modality in ("DX", "CR") else "axial"
            out.append((view, int(row["label"]), raw.pixels[0, ..., 0], mask))
    return out


def test_dataset_info_gives_the_label_table(images: Path, tmp_path: Path) -> None:
    info = json.loads((images / "dataset_info.json").read_text())
    assert info["num_classes"] == 7 == len(LABELS)
    assert info["mask_labels"] == {str(k): v for k, v in LABELS.items()}
    assert info["masks"] == "anatomy" and info["dims"] == 2
    # the default writes the lesion masks' table beside them
    synthesize(tmp_path / "lesion", sites=1, images_per_site=10, seed=0, test_images=10)
    lesion = json.loads((tmp_path / "lesion" / "dataset_info.json").read_text())
    assert lesion["num_classes"] == 2
    assert lesion["mask_labels"] == {"0": "background", "1": "lesion"}


def test_masks_are_uint8_label_maps_on_the_image_grid(images: Path) -> None:
    for folder in _folders(images):
        for row in _rows(folder):
            ds = pydicom.dcmread(folder / row["path"], stop_before_pixels=True)
            mask = nib.load(folder / row["mask"])
            assert mask.get_data_dtype() == np.uint8
            assert mask.shape == (ds.Rows, ds.Columns)
            assert set(np.unique(np.asarray(mask.dataobj))) <= set(LABELS)


def test_every_view_shows_its_organs_at_plausible_sizes(
    cases: list[tuple[str, int, np.ndarray, np.ndarray]],
) -> None:
    frontal = [c for c in cases if c[0] == "frontal"]
    axial = [c for c in cases if c[0] == "axial"]
    assert len(frontal) >= 15 and len(axial) >= 30
    for _, _, _, mask in frontal:
        share = np.bincount(mask.ravel(), minlength=7) / mask.size
        # a PA film: lung fields 25-35% of the image, the heart and liver always in view
        assert 0.18 < share[RIGHT] + share[LEFT] < 0.42
        assert share[RIGHT] > 0.06 and share[LEFT] > 0.05
        assert 0.04 < share[HEART] < 0.16
        assert 0.04 < share[LIVER] < 0.3
        assert share[BODY] > 0.12 and share[0] > 0.05
    lungs = np.mean([(m == RIGHT).mean() + (m == LEFT).mean() for *_, m in frontal])
    assert 0.25 < lungs < 0.35
    for _, _, _, mask in axial:
        share = np.bincount(mask.ravel(), minlength=7) / mask.size
        # every level of a chest slice cuts both lungs; heart and liver depend on the level
        assert share[RIGHT] > 0.001 and share[LEFT] > 0.001
        assert 0.1 < share[BODY] < 0.5
        assert share[HEART] < 0.12 and share[LIVER] < 0.3
    with_heart = np.mean([(m == HEART).any() for *_, m in axial])
    with_liver = np.mean([(m == LIVER).any() for *_, m in axial])
    assert 0.25 < with_heart < 0.8
    assert 0.03 < with_liver < 0.4


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def test_organs_lie_where_anatomy_puts_them(
    cases: list[tuple[str, int, np.ndarray, np.ndarray]],
) -> None:
    for view, _, _, mask in cases:
        body = _centroid(mask > 0)
        right, left = _centroid(mask == RIGHT), _centroid(mask == LEFT)
        # the patient's right is on the image's left, on axial slices and PA films alike
        assert right[1] < body[1] < left[1]
        if view == "frontal":
            heart, liver = _centroid(mask == HEART), _centroid(mask == LIVER)
            lungs = _centroid((mask == RIGHT) | (mask == LEFT))
            assert heart[1] > body[1] and heart[0] > lungs[0]  # left lower mediastinum
            assert liver[1] < body[1] and liver[0] > heart[0]  # under the right dome
        elif (mask == LIVER).sum() > 50:
            assert _centroid(mask == LIVER)[1] < body[1]
        if (mask == HEART).sum() > 50 and view == "axial":
            assert _centroid(mask == HEART)[0] < body[0]  # anterior


def test_lesion_label_only_in_lesion_images_and_inside_a_lung(
    cases: list[tuple[str, int, np.ndarray, np.ndarray]],
) -> None:
    assert {label for _, label, _, _ in cases} == {0, 1}
    for _, label, _, mask in cases:
        lesion = mask == LESION
        assert lesion.any() == bool(label)
        if label:
            ring = ndimage.binary_dilation(lesion) & ~lesion
            assert np.isin(mask[ring], (RIGHT, LEFT)).all()


@pytest.mark.parametrize("seed", range(6))
def test_the_lesion_replaces_lung_and_nothing_else(seed: int) -> None:
    rng = np.random.default_rng(seed)
    grid = Grid(160, 160, (2.5, 2.5))
    tissues = organ_tissues("CT", _CT_TISSUES, rng)
    patient = torso.sample_torso(rng)
    z = float(rng.uniform(-30, 150))
    ill = torso.with_nodule(patient, rng, z, 1.8)
    assert ill is not None
    _, _, without = torso.render_slice(patient, z, grid, tissues)
    _, _, labels = torso.render_slice(ill, z, grid, tissues)
    lesion = labels == LESION
    assert lesion.any()
    assert np.isin(without[lesion], (RIGHT, LEFT)).all()
    assert (labels[~lesion] == without[~lesion]).all()
    chest = film.sample_film(rng, lesion=True, min_radius=1.8)
    xr = organ_tissues("DX", _XR_TISSUES, rng)
    _, _, film_labels = film.render_film(chest, Grid(150, 120, (2.8, 2.8)), xr)
    _, _, film_without = film.render_film(replace(chest, lesion=None), Grid(150, 120, (2.8, 2.8)),
                                          xr)
    lesion = film_labels == LESION
    assert lesion.any() and np.isin(film_without[lesion], (RIGHT, LEFT)).all()


def test_image_boundaries_follow_the_masks(
    cases: list[tuple[str, int, np.ndarray, np.ndarray]],
) -> None:
    checked = 0
    for _, _, image, mask in cases:
        for organ in (RIGHT, LEFT, HEART, LIVER):
            inside = ndimage.binary_erosion(mask == organ)
            grown = ndimage.binary_dilation(mask == organ, iterations=3)
            ring = grown & ~ndimage.binary_dilation(mask == organ)
            if inside.sum() < 20:
                continue
            gap = abs(float(image[inside].mean()) - float(image[ring].mean()))
            # the organ's mean stands out from its surroundings by more than its own spread
            assert gap > float(image[inside].std()), (organ, gap)
            checked += 1
    assert checked > 150


def test_the_label_map_is_what_was_painted() -> None:
    # Shifting the mask by two pixels breaks the agreement the test above measures.
    rng = np.random.default_rng(7)
    patient = torso.sample_torso(rng)
    tissues = organ_tissues("CT", _CT_TISSUES, rng)
    image, _, labels = torso.render_slice(patient, 40.0, Grid(128, 128, (3.0, 3.0)), tissues)
    for organ in (RIGHT, LEFT, HEART):
        inside = labels == organ
        assert image[inside].std() < 150  # one tissue (lung with vessels, or heart)
        shifted = np.roll(inside, 6, axis=1)
        assert image[shifted].std() > image[inside].std()


def test_area_fractions_helper_names_every_label() -> None:
    labels = np.array([[0, 1], [2, 6]], dtype=np.uint8)
    shares = anatomy.area_fractions(labels)
    assert shares["lesion"] == shares["right lung"] == 0.25 and shares["heart"] == 0.0


def test_volumes_pass_check_data(volumes: Path) -> None:
    for folder in _folders(volumes):
        result = runner.invoke(app, ["check-data", str(folder), "--task", "segment",
                                     "--num-classes", "7", "--json"])
        card = json.loads(result.output)
        if folder.name == "test":
            # a held-out set has no training rows, which a site needs; its files must be clean
            assert result.exit_code == EXIT_BAD_INPUT
            assert all("training" in reason for reason in card["reasons"]), card["reasons"]
        else:
            assert result.exit_code == 0, result.output
            assert card["usable"]
        assert not card["problems"] and not card["masks_out_of_range"]
        assert sum(card["mask_rows"].values()) == len(_rows(folder))
        assert set(card["mask_values"]) == set(LABELS)


def test_volumes_are_one_series_per_row(volumes: Path) -> None:
    info = json.loads((volumes / "dataset_info.json").read_text())
    assert info["dims"] == 3 and info["num_classes"] == 7
    for folder in _folders(volumes):
        for row in _rows(folder)[:3]:
            files = sorted((folder / row["path"]).iterdir())
            headers = [pydicom.dcmread(f) for f in files]
            assert 32 <= len(headers) <= 48
            assert len({ds.SeriesInstanceUID for ds in headers}) == 1
            assert len({ds.SOPInstanceUID for ds in headers}) == len(headers)
            assert {ds.Modality for ds in headers} <= {"CT", "MR"}
            assert {ds.Rows for ds in headers} <= {64, 80, 96} | {r for r in range(48, 97, 8)}
            thickness = float(headers[0].SliceThickness)
            assert 3.0 <= thickness <= 5.0
            z = sorted(float(ds.ImagePositionPatient[2]) for ds in headers)
            assert np.allclose(np.diff(z), thickness, atol=1e-3)
            assert all(list(map(float, ds.ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0]
                       for ds in headers)
            mask = nib.load(folder / row["mask"])
            assert mask.shape == (headers[0].Columns, headers[0].Rows, len(headers))
            assert np.allclose(mask.header.get_zooms(),
                               (*map(float, headers[0].PixelSpacing), thickness))


def test_volume_masks_align_with_their_images(volumes: Path) -> None:
    for folder in _folders(volumes):
        for row in _rows(folder)[:4]:
            image = read_raw(folder / row["path"])
            labels = read_raw(folder / row["mask"], as_labels=True).pixels[..., 0]
            pixels = image.pixels[..., 0]
            assert labels.shape == pixels.shape
            lungs = np.isin(labels, (RIGHT, LEFT))
            solid = np.isin(labels, (HEART, LIVER))
            # air-filled lung is darker than heart and liver on CT and MR alike
            assert pixels[lungs].mean() < pixels[solid].mean() - 3 * pixels[lungs].std()
            if image.meta.modality == "CT":
                assert pixels[lungs].mean() < -600
                assert np.median(pixels[labels == 0]) < -900
            assert (labels == LESION).any() == (row["label"] == "1")


def test_a_mask_off_the_series_grid_is_refused(volumes: Path, tmp_path: Path) -> None:
    folder = volumes / "sites" / "hospital-01"
    row = _rows(folder)[0]
    mask = nib.load(folder / row["mask"])
    image = folder / row["path"]
    like = read_raw(image).meta
    decode_mask(folder / row["mask"], Preprocess(), like=like, image=image)  # on the grid
    moved = mask.affine.copy()
    moved[2, 3] += 2 * mask.header.get_zooms()[2]
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj), moved), tmp_path / "moved.nii.gz")
    with pytest.raises(ImageError):  # two slices off: it no longer covers its image
        decode_mask(tmp_path / "moved.nii.gz", Preprocess(), like=like, image=image)


def test_volumes_with_lesion_masks(tmp_path: Path) -> None:
    synthesize(tmp_path / "v", sites=1, images_per_site=10, seed=2, test_images=10, dims=3)
    for folder in _folders(tmp_path / "v"):
        for row in _rows(folder):
            values = set(np.unique(np.asarray(nib.load(folder / row["mask"]).dataobj)))
            assert values == ({0, 1} if row["label"] == "1" else {0})


def test_same_seed_same_files(images: Path, volumes: Path, tmp_path: Path) -> None:
    synthesize(tmp_path / "2d", **ANATOMY_2D)
    assert _digest(tmp_path / "2d") == _digest(images)
    synthesize(tmp_path / "3d", **VOLUMES)
    assert _digest(tmp_path / "3d") == _digest(volumes)
    other = {**ANATOMY_2D, "seed": 4, "sites": 1}
    synthesize(tmp_path / "other", **other)
    mask = "sites/hospital-01/masks/img_0001.nii.gz"
    assert _digest(tmp_path / "other")[mask] != _digest(images)[mask]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--masks", "organs"], "--masks must be one of lesion, anatomy"),
     (["--dims", "4"], "--dims must be 2")],
)
def test_cli_refuses_unknown_masks_and_dims(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == EXIT_BAD_INPUT
    assert message in result.output
    assert not (tmp_path / "x").exists()


def test_cli_writes_anatomy(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "o"), "--sites", "1",
                                 "--images-per-site", "10", "--test-images", "10",
                                 "--masks", "anatomy"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "o" / "dataset_info.json").read_text())
    assert info["num_classes"] == 7
