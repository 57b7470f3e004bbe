"""`medfed predict`: inputs, the source grid, the model file, and the outputs of both tasks.

The models are built untrained and saved as a run saves them (`RunRecord.save_model`): what is
checked here is where every output lands and what it references, not how good the model is
(the saliency tests and the bench judge quality).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from client.predict.grid import to_source, write_map
from client.predict.inputs import find_inputs
from client.predict.model import load_predictor
from client.predict.run import predict
from common.config import ConfigError, RunConfig
from common.data import Preprocess
from common.data.image import decode_mask, load_image
from common.modelfile import UnsafeModelFile
from models import build_model
from server.record import RunRecord
from simulations.synth import synthesize
from tests.medfed.helpers import require_tool

MEDFED = [sys.executable, "-m", "medfed"]
DCIODVFY = "/usr/bin/dciodvfy"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    synthesize(out, sites=1, images_per_site=10, test_images=10, seed=4)
    return out


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("volumes")
    synthesize(out, sites=1, images_per_site=10, test_images=10, seed=5, dims=3)
    return out


def saved_run(folder: Path, **settings: object) -> Path:
    """A run folder holding an untrained model.pt as `medfed simulate` writes it."""
    cfg = RunConfig(image_size=32, dp=False, **settings)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = build_model(cfg.model, **cfg.network_args())
    folder.mkdir(parents=True, exist_ok=True)
    RunRecord(folder, cfg).save_model(
        {k: v.detach().numpy() for k, v in model.state_dict().items()}
    )
    return folder


def ct_slice(path: Path, *, framed: bool = True, rows: int = 40, cols: int = 56) -> Path:
    """A small CT image; framed: with a patient frame (position, orientation, spacing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CT", "P1"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [0.7, 0.7]
    if framed:
        ds.ImagePositionPatient = [-10.0, -20.0, 5.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = generate_uid()
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(0, 1000, (rows, cols), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def plain_folder(folder: Path, phantoms: Path, count: int) -> Path:
    """The first `count` phantom test images as a plain folder (no labels.csv)."""
    folder.mkdir()
    for i, image in enumerate(sorted((phantoms / "test" / "images").iterdir())[:count]):
        shutil.copy(image, folder / f"{i}.dcm")
    return folder


def referenced(seg: pydicom.Dataset) -> set[str]:
    """The SOP Instance UIDs a SEG references."""
    return {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }


# --- the source grid --------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(40, 56), (56, 40), (32, 32)])
def test_maps_come_back_on_the_source_grid_where_the_model_saw_them(rows: int, cols: int) -> None:
    # a bright pixel in the source, as the model sees it after pad + resize, maps back there
    pre = Preprocess(image_size=32)
    image = np.zeros((1, 1, rows, cols), np.float32)
    image[0, 0, 11, 29] = 1.0
    from common.data.normalize import pad_to_square, resize

    seen = resize(pad_to_square(image), pre.image_size)
    back = to_source(seen, rows, cols)
    assert back.shape == (1, 1, rows, cols)
    r, c = np.unravel_index(int(back[0, 0].argmax()), (rows, cols))
    assert abs(r - 11) <= 1 and abs(c - 29) <= 1


@pytest.mark.parametrize("framed", [True, False])
def test_a_written_map_is_read_back_as_a_mask_on_its_image(tmp_path: Path, framed: bool) -> None:
    # medfed's own mask reader places the map on the image pixel for pixel: the axis convention
    # of masks, with and without a patient frame
    source = ct_slice(tmp_path / "ct.dcm", framed=framed)
    labels = np.zeros((1, 40, 56), np.uint8)
    labels[0, 3:9, 40:50] = 2
    labels[0, 30:35, 2:6] = 1
    path = write_map(tmp_path / "map.nii.gz", labels, source)
    pre = Preprocess(image_size=56)
    image = load_image(source, pre)
    placed = decode_mask(path, Preprocess(image_size=56), like=image.meta, image=None)[0]
    from common.data.normalize import pad_to_square

    np.testing.assert_array_equal(placed[:, 0], pad_to_square(labels[:, None])[:, 0])


def test_probability_maps_keep_their_values(tmp_path: Path) -> None:
    source = ct_slice(tmp_path / "ct.dcm")
    maps = np.random.default_rng(1).random((1, 40, 56, 2)).astype(np.float32)
    path = write_map(tmp_path / "p.nii.gz", maps, source)
    stored = nib.load(path)
    assert stored.get_data_dtype() == np.uint8
    np.testing.assert_allclose(np.swapaxes(stored.get_fdata(), 0, 2), maps, atol=1 / 254)


# --- inputs -----------------------------------------------------------------------------------


def test_a_plain_folder_is_walked_and_other_files_counted(tmp_path: Path, volumes: Path) -> None:
    data = tmp_path / "data"
    series = next(p for p in (volumes / "test").rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    shutil.copytree(series, data / "patient1" / "ct")
    ct_slice(data / "xray" / "one.dcm", framed=False)
    ct_slice(data / "xray" / "two.dcm", framed=False)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), data / "mr.nii.gz")
    (data / "notes.txt").write_text("not an image")
    (data / ".DS_Store").write_text("litter")
    found = find_inputs(data)
    names = [item.name for item in found.items]
    assert names == ["mr.nii.gz", "patient1/ct", "xray/one.dcm", "xray/two.dcm"]
    assert found.ignored == ["notes.txt"] and not found.labelled


def test_no_image_in_data_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no DICOM or NIfTI image found"):
        find_inputs(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        find_inputs(tmp_path / "missing")


# --- the model file ---------------------------------------------------------------------------


class _Shell:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/medfed-predict-pwned",))


def test_a_crafted_model_file_is_refused_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"model": "cnn", "model_args": {}, "state_dict": {}, "x": _Shell()}, path,
               pickle_module=pickle)
    with pytest.raises(UnsafeModelFile, match="refused"):
        load_predictor(path)
    assert not Path("/tmp/medfed-predict-pwned").exists()


def test_weights_that_do_not_fit_their_network_are_named(tmp_path: Path) -> None:
    run = saved_run(tmp_path / "run")
    saved = torch.load(run / "model.pt", weights_only=True)
    saved["model_args"]["width"] = 4  # the weights are width 8's
    torch.save(saved, run / "model.pt")
    with pytest.raises(UnsafeModelFile, match="do not fit the network"):
        load_predictor(run)


def test_a_gan_run_is_not_predicted(tmp_path: Path) -> None:
    run = saved_run(tmp_path / "run", task="synthesize", model="cgan")
    with pytest.raises(ConfigError, match="--task synthesize"):
        load_predictor(run)


# --- classification ---------------------------------------------------------------------------


def test_classifier_predictions_saliency_and_secondary_captures(
    tmp_path: Path, phantoms: Path
) -> None:
    run = saved_run(tmp_path / "run")
    out = tmp_path / "out"
    summary = predict(run, phantoms / "test", out, batch_size=4)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    labels = list(csv.DictReader((phantoms / "test" / "labels.csv").open()))
    assert [r["path"] for r in rows] == [r["path"] for r in labels]
    assert summary.predicted == len(labels) and not summary.skipped
    for row, truth in zip(rows, labels, strict=True):
        assert 0.0 <= float(row["score"]) <= 1.0
        assert row["decision"] == ("positive" if float(row["score"]) >= float(row["threshold"])
                                   else "negative")
        assert row["label"] == truth["label"]
        heat = nib.load(out / row["saliency"])
        source = pydicom.dcmread(phantoms / "test" / row["path"])
        assert heat.shape[:2] == (source.Columns, source.Rows)
        capture = pydicom.dcmread(out / row["dicom"])
        assert capture.StudyInstanceUID == source.StudyInstanceUID
        assert capture.SeriesInstanceUID != source.SeriesInstanceUID
        assert "DERIVED" in capture.ImageType
        assert f"{float(row['score']):.2f} {row['decision']}" in capture.SeriesDescription
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == len(labels) and 0.0 <= metrics["auc"] <= 1.0


def test_scores_only_without_explain(tmp_path: Path, phantoms: Path) -> None:
    out = tmp_path / "out"
    predict(saved_run(tmp_path / "run"), phantoms / "test", out, explain=False)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert all(row["saliency"] == "" and row["dicom"] == "" for row in rows)
    assert not (out / "saliency").exists()


def test_unreadable_files_are_named_and_the_rest_predicted(
    tmp_path: Path, phantoms: Path
) -> None:
    data = plain_folder(tmp_path / "plain", phantoms, 3)
    (data / "broken.dcm").write_bytes(b"DICM but not really")
    truncated = (data / "0.dcm").read_bytes()
    (data / "truncated.dcm").write_bytes(truncated[: len(truncated) // 3])
    summary = predict(saved_run(tmp_path / "run"), data, tmp_path / "out", explain=False)
    assert summary.predicted == 3
    assert sorted(s["path"] for s in summary.skipped) == ["broken.dcm", "truncated.dcm"]
    kept = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["path"] for s in kept["skipped"]] == [s["path"] for s in summary.skipped]
    assert not (tmp_path / "out" / "metrics.json").exists()  # no labels, no scores


# --- segmentation -----------------------------------------------------------------------------


def test_segmenter_writes_masks_probabilities_and_a_seg_per_series(
    tmp_path: Path, phantoms: Path
) -> None:
    run = saved_run(tmp_path / "run", task="segment", model="unet")
    out = tmp_path / "out"
    predict(run, phantoms / "test", out)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 10
    for row in rows:
        source = pydicom.dcmread(phantoms / "test" / row["path"])
        mask = np.swapaxes(np.asarray(nib.load(out / row["mask"]).dataobj), 0, 2)
        assert mask.shape == (1, source.Rows, source.Columns)
        seg = hd.seg.segread(out / row["dicom"])
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert referenced(seg) == {source.SOPInstanceUID}
        frames = seg.get_pixels_by_source_instance(
            [source.SOPInstanceUID], combine_segments=True, skip_overlap_checks=True,
        )
        np.testing.assert_array_equal(frames[0], mask[0])
        assert "dice" in row
    metrics = json.loads((out / "metrics.json").read_text())
    assert "dice" in metrics and metrics["images"] == 10


def test_a_series_folder_becomes_one_seg_over_its_slices(tmp_path: Path, volumes: Path) -> None:
    data = tmp_path / "plain"
    series = next(p for p in (volumes / "test").rglob("*") if p.is_dir() and any(p.glob("*.dcm")))
    shutil.copytree(series, data / "ct")
    out = tmp_path / "out"
    predict(saved_run(tmp_path / "run", task="segment", model="unet"), data, out)
    (row,) = list(csv.DictReader((out / "predictions.csv").open()))
    seg = hd.seg.segread(out / row["dicom"])
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((data / "ct").iterdir())]
    assert referenced(seg) == {ds.SOPInstanceUID for ds in slices}
    mask = np.swapaxes(np.asarray(nib.load(out / row["mask"]).dataobj), 0, 2)
    assert mask.shape == (len(slices), slices[0].Rows, slices[0].Columns)


# --- the command ------------------------------------------------------------------------------


def _dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines()
            if line.startswith("Error")]


@pytest.mark.parametrize("task, model", [("classify", "cnn"), ("segment", "unet")])
def test_the_command_writes_dicom_dciodvfy_accepts(
    tmp_path: Path, phantoms: Path, task: str, model: str
) -> None:
    require_tool(DCIODVFY, "install dicom3tools (`sudo make test-deps`)")
    run = saved_run(tmp_path / "run", task=task, model=model)
    out = tmp_path / "out"
    done = subprocess.run(
        [*MEDFED, "predict", str(run), "--data", str(phantoms / "test"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "10 images predicted" in done.stdout
    written = sorted((out / "dicom").glob("*.dcm"))
    assert written
    for path in written:
        assert _dciodvfy_errors(path) == [], path
    if task == "classify":  # the command's own checks, once
        again = subprocess.run(
            [*MEDFED, "predict", str(run), "--data", str(phantoms / "test"), "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert again.returncode == 2 and "--force" in again.stderr


def test_the_command_refuses_a_crafted_model_with_exit_2(tmp_path: Path, phantoms: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"model": "cnn", "x": _Shell()}, path, pickle_module=pickle)
    done = subprocess.run(
        [*MEDFED, "predict", str(path), "--data", str(phantoms / "test"),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "refused to load" in done.stderr and "Traceback" not in done.stderr


def test_a_broken_mask_costs_its_score_not_its_prediction(tmp_path: Path, phantoms: Path) -> None:
    data = tmp_path / "test"
    shutil.copytree(phantoms / "test", data)
    first = next(csv.DictReader((data / "labels.csv").open()))
    (data / first["mask"]).write_bytes(b"not a mask")
    out = tmp_path / "out"
    summary = predict(saved_run(tmp_path / "run", task="segment", model="unet"), data, out)
    assert summary.predicted == 10 and not summary.skipped
    assert any(first["path"] in warning and "not scored" in warning
               for warning in summary.warnings)
    assert json.loads((out / "metrics.json").read_text())["images"] == 9


def test_outputs_inside_the_data_folder_are_not_read_as_inputs(
    tmp_path: Path, phantoms: Path
) -> None:
    data = plain_folder(tmp_path / "plain", phantoms, 2)
    run = saved_run(tmp_path / "run", task="segment", model="unet")
    predict(run, data, data / "out")
    again = predict(run, data, data / "out2")
    assert again.predicted == 2 and not again.skipped


def test_force_clears_predict_outputs_only(tmp_path: Path, phantoms: Path) -> None:
    from client.predict.run import clear_outputs

    out = tmp_path / "out"
    predict(saved_run(tmp_path / "run"), plain_folder(tmp_path / "plain", phantoms, 2), out)
    (out / "my-notes.txt").write_text("the radiologist's")
    clear_outputs(out)
    assert sorted(p.name for p in out.iterdir()) == ["my-notes.txt"]
