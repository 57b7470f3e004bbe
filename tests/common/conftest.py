"""Writers for tiny real-format test data (DICOM with pydicom, NIfTI with nibabel)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def make_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "MR",
    bits_stored: int | None = None,
    **attrs: Any,
) -> Dataset:
    """An uncompressed image dataset around `pixels` ((F,) R, C (, 3)), plus `attrs`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = {"CT": CT_STORAGE, "MR": MR_STORAGE}.get(modality, SC_STORAGE)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = attrs.pop("SeriesInstanceUID", "1.2.826.0.1.3680043.8.498.1")
    bits = bits_stored or (8 if pixels.dtype == np.uint8 else 16)
    ds.set_pixel_data(pixels, photometric, bits)
    for name, value in attrs.items():
        setattr(ds, name, value)
    return ds


def write_dicom(
    path: Path, pixels: np.ndarray, *, syntax: str | None = None, **kwargs: Any
) -> Path:
    """Write `pixels` as a DICOM file, compressed with pydicom's encoders when `syntax` is set."""
    ds = make_dataset(pixels, **kwargs)
    if syntax is not None:
        ds.compress(UID(syntax))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_jpeg_baseline(path: Path, pixels: np.ndarray, photometric: str) -> Path:
    """Encode 8-bit `pixels` with Pillow and encapsulate them as JPEG Baseline DICOM."""
    colour = pixels.ndim == 3
    buffer = io.BytesIO()
    # subsampling=1 is 4:2:2, which is what YBR_FULL_422 declares.
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, subsampling=1 if colour else 0)
    ds = make_dataset(pixels, photometric="RGB" if colour else "MONOCHROME2", modality="OT")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PhotometricInterpretation = photometric
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write `data` as NIfTI (gzip when the name ends in .gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def write_labels(site: Path, lines: Sequence[Sequence[object]], header: str = "path,label") -> Path:
    """Write site/labels.csv with `header` and one line per item of `lines`."""
    site.mkdir(parents=True, exist_ok=True)
    with (site / "labels.csv").open("w", newline="") as f:
        f.write(header + "\n")
        csv.writer(f).writerows(lines)
    return site / "labels.csv"


def mr_pixels(seed: int = 0, shape: tuple[int, ...] = (32, 32)) -> np.ndarray:
    """Random 12-bit MR-like pixels, different per seed."""
    return np.random.default_rng(seed).integers(0, 4096, shape, dtype=np.uint16)


@pytest.fixture
def dicom_file() -> Callable[..., Path]:
    return write_dicom


@pytest.fixture
def jpeg_dicom_file() -> Callable[..., Path]:
    return write_jpeg_baseline


@pytest.fixture
def nifti_file() -> Callable[..., Path]:
    return write_nifti


@pytest.fixture
def labels_csv() -> Callable[..., Path]:
    return write_labels


@pytest.fixture
def mr() -> Callable[..., np.ndarray]:
    return mr_pixels


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def dicom_dataset() -> Callable[..., Dataset]:
    return make_dataset
