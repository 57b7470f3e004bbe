"""`medfed check-data`: masks, duplicates and --num-classes on the command line (issue 20)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from medfed.cli import EXIT_BAD_INPUT, EXIT_OK, app
from tests.common.conftest import mr_pixels, write_dicom, write_labels

runner = CliRunner()


def site_with(tmp_path: Path, extra: list[list[object]], header: str = "path,label,split") -> Path:
    site = tmp_path / "site"
    lines = []
    for i in range(4):
        write_dicom(site / f"img{i}.dcm", mr_pixels(i), PixelSpacing=[1, 1])
        lines.append([f"img{i}.dcm", i % 2, "train" if i < 3 else "test"])
    if "mask" in header:
        lines = [[*line[:2], "", line[2]] for line in lines]
    write_labels(site, [*lines, *extra], header=header)
    return site


def test_check_data_names_a_mask_whose_geometry_does_not_match(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_dicom(site / "extra.dcm", mr_pixels(9), PixelSpacing=[1, 1])
    mask = np.zeros((30, 32, 1), dtype=np.uint8)  # 32x32 image, 30-row mask
    nib.save(nib.Nifti1Image(mask, np.eye(4)), site / "extra_mask.nii.gz")
    site_with(tmp_path, [["extra.dcm", 1, "extra_mask.nii.gz", "train"]],
              header="path,label,mask,split")
    result = runner.invoke(app, ["check-data", str(site)])
    assert result.exit_code == EXIT_OK, result.output
    text = " ".join(result.output.split())
    assert "extra_mask.nii.gz: mask geometry does not match its image" in text
    assert "row extra.dcm skipped" in text
    # classification does not read masks, so --task classify leaves them alone
    result = runner.invoke(app, ["check-data", "--task", "classify", "--json", str(site)])
    assert json.loads(result.output)["problems"] == []


def test_check_data_num_classes_refuses_label_7_and_names_the_row(tmp_path: Path) -> None:
    site = site_with(tmp_path, [])
    (site / "labels.csv").write_text(
        (site / "labels.csv").read_text().replace("img2.dcm,0,train", "img2.dcm,7,train")
    )
    assert runner.invoke(app, ["check-data", str(site)]).exit_code == EXIT_OK
    result = runner.invoke(app, ["check-data", "--num-classes", "2", str(site)])
    assert result.exit_code == EXIT_BAD_INPUT
    text = " ".join(result.output.split())
    assert "NOT USABLE: 1 labels.csv row(s) have a label outside 0..1" in text
    assert "img2.dcm (train): label 7" in text
    result = runner.invoke(app, ["check-data", "--num-classes", "2", "--json", str(site)])
    card = json.loads(result.output)
    assert card["num_classes"] == 2
    assert card["labels_out_of_range"] == [{"path": "img2.dcm", "split": "train", "label": 7}]
    assert runner.invoke(app, ["check-data", "--num-classes", "8", str(site)]).exit_code == 0


def test_check_data_reports_an_enormous_label(tmp_path: Path) -> None:
    site = site_with(tmp_path, [])
    (site / "labels.csv").write_text(
        (site / "labels.csv").read_text().replace("img1.dcm,1,", f"img1.dcm,{10**12},")
    )
    result = runner.invoke(app, ["check-data", "--num-classes", "2", str(site)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert f"img1.dcm (train): label {10**12}" in result.output


def test_check_data_rejects_fewer_than_two_classes(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check-data", "--num-classes", "1", str(site_with(tmp_path, []))])
    assert result.exit_code == EXIT_BAD_INPUT


def test_check_data_counts_a_train_test_copy_in_its_json(tmp_path: Path) -> None:
    site = site_with(tmp_path, [["copy.dcm", 0, "test"]])
    (site / "copy.dcm").write_bytes((site / "img0.dcm").read_bytes())
    result = runner.invoke(app, ["check-data", "--json", str(site)])
    assert result.exit_code == EXIT_OK
    card = json.loads(result.output)
    assert card["cross_split_duplicates"] == 1
    assert card["duplicates"][0]["paths"] == ["img0.dcm", "copy.dcm"]
    text = runner.invoke(app, ["check-data", str(site)]).output
    assert "warning: LEAK: 1 image(s) appear in more than one split" in text
