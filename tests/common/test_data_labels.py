"""labels.csv parsing, validation messages, seeded split; Preprocess validation."""

from __future__ import annotations

from collections import Counter

import pytest

from common.data import DataError, Preprocess, Row, read_labels
from common.data.labels import seeded_split


def test_rows_parsed_with_optional_columns(tmp_path, labels_csv):
    labels_csv(
        tmp_path,
        [
            ["a.dcm", "1", "a_mask.nii.gz", "val"],
            ["b/", "", "", ""],
            [".\\c\\d.nii", "0", "", "TEST"],
        ],
        header="path,label,mask,split,notes",
    )
    rows = read_labels(tmp_path, seed=3)
    assert rows[0] == Row("a.dcm", 1, "a_mask.nii.gz", "val")
    assert rows[1] == Row("b", None, None, seeded_split("b", 3))
    assert rows[2] == Row("c/d.nii", 0, None, "test")


def test_header_with_byte_order_mark_and_blank_lines(tmp_path):
    (tmp_path / "labels.csv").write_text("\ufeffPath, Label\na.dcm,2\n\n", encoding="utf-8")
    assert read_labels(tmp_path) == [Row("a.dcm", 2, None, seeded_split("a.dcm", 0))]


def test_seeded_split_is_deterministic_stable_and_70_15_15():
    paths = [f"img_{i:05d}.dcm" for i in range(4000)]
    first = [seeded_split(p, 7) for p in paths]
    assert first == [seeded_split(p, 7) for p in paths]
    shares = Counter(first)
    assert abs(shares["train"] / 4000 - 0.70) < 0.03
    assert abs(shares["val"] / 4000 - 0.15) < 0.03
    assert abs(shares["test"] / 4000 - 0.15) < 0.03
    other_seed = [seeded_split(p, 8) for p in paths]
    assert sum(a != b for a, b in zip(first, other_seed, strict=True)) > 1000


def test_adding_rows_does_not_reshuffle_existing_ones(tmp_path, labels_csv):
    labels_csv(tmp_path, [[f"{i}.dcm", i % 2] for i in range(50)])
    before = read_labels(tmp_path, seed=1)
    labels_csv(tmp_path, [[f"{i}.dcm", i % 2] for i in range(80)])
    after = read_labels(tmp_path, seed=1)
    assert after[:50] == before


def test_explicit_split_is_kept_empty_split_is_seeded(tmp_path, labels_csv):
    labels_csv(tmp_path, [["a.dcm", 0, "test"], ["b.dcm", 0, ""]], header="path,label,split")
    rows = read_labels(tmp_path, seed=5)
    assert rows[0].split == "test" and rows[1].split == seeded_split("b.dcm", 5)


@pytest.mark.parametrize(
    ("header", "lines", "message"),
    [
        (
            "path,diagnosis",
            [["a.dcm", "1"]],
            r"labels.csv line 1: missing column 'label' "
            r"\(found: path, diagnosis\); the first line must be the header path,label",
        ),
        (
            "path,label",
            [["a.dcm", "1"], ["b.dcm", "pneumonia"]],
            r"labels.csv line 3: label 'pneumonia' is not an integer; use integer class ids",
        ),
        ("path,label", [["a.dcm", "-1"]], r"line 2: label -1 is negative"),
        ("path,label", [["a.dcm", "1.5"]], r"line 2: label '1.5' is not an integer"),
        (
            "path,label,split",
            [["a.dcm", "1", "training"]],
            r"line 2: split 'training' is not one of train, val, test",
        ),
        (
            "path,label",
            [["a.dcm", "1"], ["./a.dcm", "0"]],
            r"line 3: path 'a.dcm' is already listed on line 2",
        ),
        ("path,label", [["", "1"]], r"line 2: empty path"),
        ("path,path,label", [["a", "b", "1"]], r"column 'path' appears more than once"),
    ],
)
def test_malformed_labels_name_file_line_and_fix(tmp_path, labels_csv, header, lines, message):
    labels_csv(tmp_path, lines, header=header)
    with pytest.raises(DataError, match=message) as caught:
        read_labels(tmp_path)
    assert str(tmp_path / "labels.csv") in str(caught.value)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("path", "/etc/passwd"),
        ("path", "../other_site/a.dcm"),
        ("path", "a/../../b.dcm"),
        ("path", "C:\\scans\\a.dcm"),
        ("mask", "../masks/a.nii"),
    ],
)
def test_paths_escaping_the_site_are_rejected(tmp_path, labels_csv, column, value):
    line = [value, "1", "m.nii"] if column == "path" else ["a.dcm", "1", value]
    labels_csv(tmp_path, [line], header="path,label,mask")
    with pytest.raises(DataError, match=rf"line 2: {column} .* points outside the site folder"):
        read_labels(tmp_path)


def test_missing_and_empty_labels_file(tmp_path):
    with pytest.raises(DataError, match=r"labels.csv: not found; create it with"):
        read_labels(tmp_path)
    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(DataError, match=r"labels.csv: file is empty"):
        read_labels(tmp_path)
    with pytest.raises(DataError, match="site folder does not exist"):
        read_labels(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 3}, "image_size must be >= 8 and <= 2048, got 3"),
        ({"image_size": 64.0}, "image_size must be an integer, got 64.0"),
        ({"channels": 2}, r"channels must be 1 \(grey\) or 3 \(RGB\), got 2"),
        ({"slices": "middle"}, "slices must be 'all' or 'center', got 'middle'"),
    ],
)
def test_preprocess_validates_with_clear_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocess(**kwargs)
