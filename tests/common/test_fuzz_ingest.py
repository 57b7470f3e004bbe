"""Seeded mutation fuzzing of the reading path used by check-data and by the loaders.

Valid DICOM files in every transfer syntax medfed's synthetic hospitals and tests write
(explicit/implicit VR little endian, deflated, RLE, JPEG-LS, JPEG 2000, JPEG baseline colour,
multi-frame, float pixel data, a series folder) and valid NIfTI/MGH volumes are mutated:
truncations, byte flips, splices, invalid values for their VR, wrong element lengths, absurd
sizes, damaged NIfTI header fields. Every mutant goes through `check_site` (what `medfed
check-data` runs) and through `SiteData.split` (what the training loaders run), with and
without masks. Properties: nothing escapes as an exception, every row is either read (finite
pixels in [0, 1]) or named with a reason, and the unmutated originals still read.

A failing mutant is reproducible from its file name: m<index>-<seed file>-<operation>.
"""

from __future__ import annotations

import gzip
import io
import random
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from common.data import Preprocess, SiteData, check_site
from tests.common.conftest import (
    make_dataset,
    mr_pixels,
    write_jpeg_baseline,
    write_labels,
    write_nifti,
)
from tests.common.ingest_files import file_bytes, float_dataset, patch_value

PRE = Preprocess(image_size=16)
DEFAULT_MUTANTS = 500
SLOW_MUTANTS = 1200


@dataclass(frozen=True)
class Seed:
    """One valid file: its name (suffix decides the reader) and bytes."""

    name: str
    data: bytes

    @property
    def dicom(self) -> bool:
        return self.name.endswith(".dcm")

    @property
    def suffix(self) -> str:
        return self.name[self.name.index(".") :]


# ---- seeds: valid files, small so that hundreds decode in seconds ----


def _dicom_seed(name: str, pixels: np.ndarray, syntax: str | None = None, **attrs) -> Seed:
    ds = make_dataset(pixels, **attrs)
    if syntax in (DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax  # encodings of the whole dataset, not codecs
    elif syntax is not None:
        ds.compress(syntax)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return Seed(name, buffer.getvalue())


def build_seeds(tmp: Path) -> list[Seed]:
    tmp.mkdir(parents=True, exist_ok=True)
    grey = mr_pixels(1, (24, 20))
    ct = dict(modality="CT", RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40,
              WindowWidth=400, PixelSpacing=[0.7, 0.7], InstanceNumber=4)
    seeds = [
        _dicom_seed("explicit.dcm", grey, **ct),
        _dicom_seed("implicit.dcm", grey, ImplicitVRLittleEndian),
        _dicom_seed("deflated.dcm", grey, DeflatedExplicitVRLittleEndian),
        _dicom_seed("rle.dcm", grey, RLELossless),
        _dicom_seed("jpegls.dcm", grey, JPEGLSLossless, modality="DX",
                    photometric="MONOCHROME1"),
        # OpenJPEG's default 6 resolution levels need at least 32 x 32 pixels.
        _dicom_seed("j2k.dcm", mr_pixels(2, (32, 32)), JPEG2000Lossless, **ct),
        _dicom_seed("frames.dcm", np.stack([grey, grey[::-1], grey[:, ::-1]])),
        Seed("float.dcm", file_bytes(float_dataset(grey.astype(np.float32) / 7))),
    ]
    rgb = np.random.default_rng(2).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    seeds.append(Seed("ybr.dcm", write_jpeg_baseline(tmp / "ybr.dcm", rgb, "YBR_FULL_422")
                      .read_bytes()))
    volume = np.random.default_rng(3).normal(100, 20, (12, 10, 4)).astype(np.float32)
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    seeds.append(Seed("vol.nii", write_nifti(tmp / "vol.nii", volume, affine).read_bytes()))
    seeds.append(Seed("vol.nii.gz", write_nifti(tmp / "vol.nii.gz", volume).read_bytes()))
    nib.save(nib.MGHImage(volume, np.eye(4)), tmp / "vol.mgz")
    seeds.append(Seed("vol.mgz", (tmp / "vol.mgz").read_bytes()))
    return seeds


def mask_seeds() -> list[Seed]:
    """Label maps on the grid of the fuzz site's good mask images (24x20 DICOM, NIfTI)."""
    labels = np.zeros((24, 20), np.uint8)
    labels[5:15, 4:12] = 1
    dicom = _dicom_seed("mask.dcm", labels, modality="OT")
    # NIfTI x runs along DICOM columns and y along rows, flipped (see common/data/nifti.py).
    nifti = nib.Nifti1Image(np.ascontiguousarray(labels[::-1, ::-1].T[:, :, None]), np.eye(4))
    return [dicom, Seed("mask.nii", nifti.to_bytes())]


# ---- mutations ----

# Values an exporter with a bug writes into an element, as raw bytes (wrong VR, wrong length).
_BAD_TEXT = [b"1A", b"-1", b"0", b"", b"nan", b"inf", b"-inf", b"1e999", b"3.7", b"1\\2\\3",
             b"  ", b"99999999999999999999", b"\xff\xfe\x00\x01", b"MONOCHROME7", b"1.2.3.4"]
_BAD_BINARY = [b"\x00", b"\x00\x00\x00", b"\xff\xff", b"\x00\x00", b"\x01\x00\x02\x00", b"",
               b"\x00\x80", b"\x07\x00"]
_KEYWORDS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
             "SamplesPerPixel", "NumberOfFrames", "PhotometricInterpretation",
             "PlanarConfiguration", "RescaleSlope", "RescaleIntercept", "WindowCenter",
             "WindowWidth", "PixelSpacing", "InstanceNumber", "Modality", "SOPClassUID",
             "ImagePositionPatient", "ImageOrientationPatient", "SpecificCharacterSet"]
_ABSURD = {"Rows": [65535, 1, 4096], "Columns": [65535, 1, 3000],
           "NumberOfFrames": [1000000, 2**31 - 1, 50]}


def _truncate(seed: Seed, rng: random.Random) -> bytes:
    return seed.data[: rng.randrange(1, len(seed.data))]


def _flip(seed: Seed, rng: random.Random) -> bytes:
    data = bytearray(seed.data)
    # Half of the flips hit the header, where a single byte changes what is declared.
    region = len(data) if rng.random() < 0.5 else min(len(data), 700)
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(region)
        data[at] = data[at] ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(data)


def _splice(seed: Seed, rng: random.Random) -> bytes:
    data = seed.data
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 96))
    if rng.random() < 0.5:
        return data[:start] + data[end:]  # deletion: everything after shifts
    return data[:end] + data[start:]  # duplication


def _raw_element(ds: pydicom.Dataset, keyword: str, raw: bytes) -> None:
    tag = Tag(tag_for_keyword(keyword))
    ds.pop(tag, None)
    ds._dict[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)


def _save(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _bad_value(seed: Seed, rng: random.Random) -> bytes:
    """1-3 elements get an invalid value for their VR (or a wrong length), present or not."""
    ds = pydicom.dcmread(io.BytesIO(seed.data))
    present: list[tuple[str, bytes]] = []
    for _ in range(rng.randint(1, 3)):
        keyword = rng.choice(_KEYWORDS)
        binary = dictionary_VR(tag_for_keyword(keyword)) in ("US", "SS", "UL")
        raw = rng.choice(_BAD_BINARY if binary else _BAD_TEXT)
        if keyword in ds:
            present.append((keyword, raw))  # edited in the bytes: pydicom would validate it
        elif not binary:
            _raw_element(ds, keyword, raw)
    try:
        data = _save(ds)
    except Exception:  # the writer refuses some values (a character set it cannot encode)
        data = seed.data
    for keyword, raw in present:
        data = patch_value(data, keyword, raw)
    return data


def _absurd_size(seed: Seed, rng: random.Random) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(seed.data))
    keyword = rng.choice(sorted(_ABSURD))
    value = rng.choice(_ABSURD[keyword])
    if keyword == "NumberOfFrames":
        ds.NumberOfFrames = value
    else:
        setattr(ds, keyword, value)
    return _save(ds)


def _wrong_length(seed: Seed, rng: random.Random) -> bytes:
    """Overwrite one element's length field in place (the value bytes stay where they were)."""
    data = bytearray(seed.data)
    ds = pydicom.dcmread(io.BytesIO(seed.data))
    implicit = ds.file_meta.get("TransferSyntaxUID") == ImplicitVRLittleEndian
    present = [k for k in _KEYWORDS + ["PixelData"] if k in ds]
    tag = Tag(tag_for_keyword(rng.choice(present)))
    at = data.find(struct.pack("<HH", tag.group, tag.element), 132)
    if at < 0:
        return _flip(seed, rng)
    lengths = [0, 1, 3, 0xFFFF, len(data), 0xFFFFFFFF, 2**31]
    vr = bytes(data[at + 4 : at + 6])
    if implicit:
        data[at + 4 : at + 8] = struct.pack("<I", rng.choice(lengths) & 0xFFFFFFFF)
    elif vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"UC", b"UR"):
        data[at + 8 : at + 12] = struct.pack("<I", rng.choice(lengths) & 0xFFFFFFFF)
    else:
        data[at + 6 : at + 8] = struct.pack("<H", rng.choice(lengths) & 0xFFFF)
    return bytes(data)


# NIfTI-1 header fields: (offset, struct format, values worth trying)
_NIFTI_FIELDS = [
    (40, "<h", [0, -1, 8, 9, 32767]),  # dim[0]
    (42, "<h", [0, -5, 32767, 1]),  # dim[1]
    (44, "<h", [0, 32767, 1]),  # dim[2]
    (46, "<h", [0, 32767, 2000]),  # dim[3]
    (48, "<h", [2, 100, 32767]),  # dim[4]
    (70, "<h", [0, 1, 32, 128, 255, 1792, 2304, 999]),  # datatype: bool, complex, RGB, junk
    (72, "<h", [0, 3, 128, 64]),  # bitpix
    (80, "<f", [float("nan"), -1.0, 0.0, float("inf")]),  # pixdim[1]
    (108, "<f", [0.0, -352.0, 1e12, float("nan")]),  # vox_offset
    (112, "<f", [float("nan"), float("inf"), 0.0, 1e38, -1.0]),  # scl_slope
    (116, "<f", [float("inf"), float("nan"), 1e38]),  # scl_inter
    (252, "<h", [0, 1, 2, 99]),  # qform_code
    (254, "<h", [0, 1, 99]),  # sform_code
    (280, "<f", [float("nan"), float("inf"), 0.0]),  # srow_x[0]
]


def _nifti_field(seed: Seed, rng: random.Random) -> bytes:
    gz = seed.name.endswith(".gz")
    data = bytearray(gzip.decompress(seed.data) if gz else seed.data)
    for _ in range(rng.randint(1, 2)):
        offset, fmt, values = rng.choice(_NIFTI_FIELDS)
        data[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, rng.choice(values))
    return gzip.compress(bytes(data), mtime=0) if gz else bytes(data)


def _nifti_content(seed: Seed, rng: random.Random) -> bytes:
    """A flip or cut inside the gzip member, so the header and voxels are hit, not the CRC."""
    if not seed.name.endswith(".gz"):
        return _flip(seed, rng)
    inner = Seed(seed.name[:-3], gzip.decompress(seed.data))
    data = _truncate(inner, rng) if rng.random() < 0.3 else _flip(inner, rng)
    return gzip.compress(data, mtime=0)


Mutation = Callable[[Seed, random.Random], bytes]
DICOM_MUTATIONS: dict[str, Mutation] = {
    "truncate": _truncate, "flip": _flip, "splice": _splice, "value": _bad_value,
    "absurd": _absurd_size, "length": _wrong_length,
}
VOLUME_MUTATIONS: dict[str, Mutation] = {
    "truncate": _truncate, "flip": _flip, "splice": _splice, "field": _nifti_field,
    "content": _nifti_content,
}


def mutants(seeds: list[Seed], count: int, seed: int) -> list[tuple[str, bytes]]:
    """`count` mutants named m<index>-<seed>-<operation><suffix>, deterministic for `seed`."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        source = seeds[index % len(seeds)]
        table = DICOM_MUTATIONS if source.dicom else VOLUME_MUTATIONS
        operation = rng.choice(sorted(table))
        stem = source.name[: source.name.index(".")]
        name = f"m{index:04d}-{stem}-{operation}{source.suffix}"
        out.append((name, table[operation](source, rng)))
    return out


# ---- the properties ----


def _check_rows(card_problems: dict[str, str], readable: set[str], rows: list[str]) -> None:
    unnamed = [r for r in rows if r not in readable and not card_problems.get(r)]
    assert not unnamed, f"neither read nor named: {unnamed[:10]}"
    both = [r for r in rows if r in readable and r in card_problems]
    assert not both, f"read and also named as skipped: {both[:10]}"


def fuzz_images(tmp_path: Path, count: int, seed: int) -> dict[str, int]:
    seeds = build_seeds(tmp_path / "seeds")
    site = tmp_path / "site"
    site.mkdir()
    lines = []
    for original in seeds:  # the unmutated files must keep reading
        (site / f"good-{original.name}").write_bytes(original.data)
        lines.append([f"good-{original.name}", len(lines) % 2, "train"])
    series = site / "series-good"
    for i in range(3):
        write_series_slice(series / f"s{i}.dcm", i)
    lines.append(["series-good", 0, "train"])
    for name, data in mutants(seeds, count, seed):
        (site / name).write_bytes(data)
        lines.append([name, len(lines) % 2, "train"])
    # A few series folders with one mutated slice each.
    rng = random.Random(seed + 1)
    series_seed = Seed("slice.dcm", (series / "s1.dcm").read_bytes())
    for index in range(max(2, count // 50)):
        folder = site / f"series-m{index:03d}"
        shutil.copytree(series, folder)
        operation = rng.choice(sorted(DICOM_MUTATIONS))
        (folder / "s1.dcm").write_bytes(DICOM_MUTATIONS[operation](series_seed, rng))
        lines.append([folder.name, 0, "train"])
    write_labels(site, lines, header="path,label,split")
    names = [line[0] for line in lines]
    good = [n for n in names if n.startswith(("good-", "series-good"))]

    # check-data's path, decoding every file.
    card = check_site(site, PRE, cache_dir=tmp_path / "cache")
    problems = {p.path: p.reason for p in card.problems}
    data = SiteData(site, PRE, cache_dir=tmp_path / "cache")
    read_from_cache = {data.rows[i].path for i in set(data.split("all").rows.tolist())}
    assert card.readable_rows == len(read_from_cache)
    _check_rows(problems, read_from_cache, names)
    assert set(good) <= read_from_cache, sorted(set(good) - read_from_cache)
    leaked = [path for path, reason in problems.items() if str(tmp_path) in reason]
    assert not leaked, f"reasons quoting the site's folders: {leaked[:5]}"

    # The loaders' path, decoding again (a cold cache), must agree with the card.
    loader = SiteData(site, PRE, cache_dir=tmp_path / "cache-cold")
    arrays = loader.split("all")
    assert np.isfinite(arrays.images).all()
    assert arrays.images.min() >= 0.0 and arrays.images.max() <= 1.0
    read_cold = {loader.rows[i].path for i in set(arrays.rows.tolist())}
    assert read_cold == read_from_cache
    assert {p.path: p.reason for p in loader.problems if p.path in names} == {
        path: reason for path, reason in problems.items() if path in names
    }
    return {"rows": len(names), "read": len(read_cold), "named": len(names) - len(read_cold)}


def write_series_slice(path: Path, index: int) -> None:
    pixels = mr_pixels(10 + index, (24, 20))
    ds = make_dataset(pixels, ImagePositionPatient=[0.0, 0.0, float(index)],
                      ImageOrientationPatient=[1, 0, 0, 0, 1, 0], InstanceNumber=index + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def fuzz_masks(tmp_path: Path, count: int, seed: int) -> dict[str, int]:
    """Mutated label maps listed as masks of good images, read by a segmentation loader."""
    site = tmp_path / "mask-site"
    site.mkdir()
    image = _dicom_seed("image.dcm", mr_pixels(5, (24, 20)))
    lines: list[list[object]] = []
    seeds = mask_seeds()
    masks = [(f"good-{s.name}", s.data) for s in seeds] + mutants(seeds, count, seed)
    for index, (name, data) in enumerate(masks):
        (site / name).write_bytes(data)
        (site / f"image{index:04d}.dcm").write_bytes(image.data)  # labels.csv lists each once
        lines.append([f"image{index:04d}.dcm", 1, name, "train"])
    write_labels(site, lines, header="path,label,mask,split")
    data = SiteData(site, PRE, cache_dir=tmp_path / "mask-cache", masks=True)
    arrays = data.split("all")
    loaded_rows = set(arrays.rows.tolist())
    named = {p.path for p in data.problems}
    for index, row in enumerate(data.rows):
        assert index in loaded_rows or row.mask in named, f"mask {row.mask}: neither read nor named"
    assert set(range(len(seeds))) <= loaded_rows  # the unmutated masks read
    if arrays.masks is not None:
        assert arrays.masks.shape[0] == arrays.images.shape[0]
    return {"rows": len(lines), "read": len(loaded_rows)}


@pytest.mark.parametrize("seed", [20])
def test_fuzz_ingest_default(tmp_path, seed):
    start = time.perf_counter()
    images = fuzz_images(tmp_path, DEFAULT_MUTANTS, seed)
    masks = fuzz_masks(tmp_path, 40, seed)
    elapsed = time.perf_counter() - start
    # Both outcomes occur: the mutations are neither all harmless nor all fatal.
    assert 0 < images["read"] < images["rows"] and images["named"] > DEFAULT_MUTANTS // 4
    print(f"fuzz: {images} masks {masks} in {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [18, 2026])
def test_fuzz_ingest_many(tmp_path, seed):
    images = fuzz_images(tmp_path, SLOW_MUTANTS, seed)
    masks = fuzz_masks(tmp_path, 200, seed)
    assert images["named"] > SLOW_MUTANTS // 4
    print(f"fuzz: {images} masks {masks}")
