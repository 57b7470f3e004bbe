"""check_site: the data card's counts, distributions, problems and usability verdict."""

from __future__ import annotations

import json

import numpy as np

from common.data import Preprocess, check_site

PRE = Preprocess(image_size=16)


def build_site(root, dicom_file, labels_csv, mr, lines):
    """lines: (name, label, split, kind) with kind "mr", "ct", "rgb" or "bad"."""
    csv_lines = []
    for name, label, split, kind in lines:
        path = root / name
        if kind == "mr":
            dicom_file(path, mr(len(csv_lines)), PixelSpacing=[0.5, 0.5])
        elif kind == "ct":
            dicom_file(
                path,
                mr(len(csv_lines), (24, 32)),
                modality="CT",
                RescaleSlope=1,
                RescaleIntercept=-1024,
            )
        elif kind == "rgb":
            rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            dicom_file(path, rgb, photometric="RGB", modality="XC")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("not dicom")
        csv_lines.append([name, label, split])
    labels_csv(root, csv_lines, header="path,label,split")
    return root


def test_usable_site_card_counts_and_distributions(tmp_path, dicom_file, labels_csv, mr):
    site = build_site(
        tmp_path / "site_b",
        dicom_file,
        labels_csv,
        mr,
        [
            ("a.dcm", 0, "train", "mr"),
            ("b.dcm", 1, "train", "mr"),
            ("c.dcm", 1, "train", "ct"),
            ("d.dcm", "", "train", "rgb"),
            ("e.dcm", 0, "val", "mr"),
            ("bad.dcm", 1, "test", "bad"),
        ],
    )
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    assert card.usable and card.reasons == []
    assert card.site == "site_b" and card.rows == 6 and card.readable_rows == 5
    assert card.rows_per_class == {"train": {-1: 1, 0: 1, 1: 2}, "val": {0: 1}, "test": {1: 1}}
    assert card.samples_per_class == {"train": {-1: 1, 0: 1, 1: 2}, "val": {0: 1}, "test": {}}
    assert (card.unlabelled_rows, card.unlabelled_samples) == (1, 1)
    assert card.modalities == {"MR": 3, "CT": 1, "XC": 1}
    assert card.sizes == {"32x32": 3, "24x32": 1, "16x16": 1}
    assert card.pixel_spacings == {"0.5x0.5": 3, "unknown": 2}
    assert card.transfer_syntaxes == {"Explicit VR Little Endian": 5}
    assert card.photometrics == {"MONOCHROME2": 4, "RGB": 1}
    assert [p.path for p in card.problems] == ["bad.dcm"]
    assert any("no readable labelled test image" in w for w in card.warnings)
    assert any("unlabelled rows: 1" in w for w in card.warnings)

    text = card.to_text()
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "site site_b: USABLE" in text
    assert "bad.dcm: not a DICOM file" in text
    assert "train  1                    2           2" in text
    round_trip = json.loads(json.dumps(card.to_dict()))
    assert round_trip["samples_per_class"]["train"] == {"-1": 1, "0": 1, "1": 2}
    assert round_trip["problems"][0]["path"] == "bad.dcm"


def test_missing_or_malformed_labels_make_the_site_unusable(tmp_path, labels_csv):
    card = check_site(tmp_path / "empty_site", PRE, cache_dir=tmp_path / "cache")
    assert not card.usable and "does not exist" in card.reasons[0]
    (tmp_path / "s").mkdir()
    card = check_site(tmp_path / "s", PRE, cache_dir=tmp_path / "cache")
    assert not card.usable and "labels.csv: not found" in card.reasons[0]
    labels_csv(tmp_path / "s", [["a.dcm", "cat"]])
    card = check_site(tmp_path / "s", PRE, cache_dir=tmp_path / "cache")
    assert not card.usable and "line 2: label 'cat' is not an integer" in card.reasons[0]
    assert "NOT USABLE" in card.to_text()


def test_no_readable_labelled_training_image_is_unusable(tmp_path, dicom_file, labels_csv, mr):
    site = build_site(
        tmp_path / "s",
        dicom_file,
        labels_csv,
        mr,
        [
            ("a.dcm", 0, "train", "bad"),
            ("b.dcm", "", "train", "mr"),
            ("c.dcm", 1, "val", "mr"),
        ],
    )
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    assert not card.usable
    assert card.reasons == [
        "no readable labelled training image (2 training rows in labels.csv); fix the skipped "
        "files below or label some training rows"
    ]


def test_single_class_site_is_usable_with_a_warning(tmp_path, dicom_file, labels_csv, mr):
    site = build_site(
        tmp_path / "s",
        dicom_file,
        labels_csv,
        mr,
        [
            ("a.dcm", 1, "train", "mr"),
            ("b.dcm", 1, "train", "mr"),
            ("c.dcm", 0, "val", "mr"),
            ("d.dcm", 1, "test", "mr"),
        ],
    )
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    assert card.usable
    assert any("single class (1)" in w and "non-IID" in w for w in card.warnings)
    assert any("val has classes never seen in training: 0" in w for w in card.warnings)
