"""Small real-DICOM hospitals on which learning is feasible in a few rounds."""

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def _write(path: Path, pixels: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "MR", "Test^Patient", "T0001"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_easy_site(root: Path, n: int, prevalence: float, rng: np.random.Generator) -> None:
    """Images of noise; a lesion (label 1) is a bright square somewhere in the image."""
    lines = ["path,label,split"]
    for i in range(n):
        label = int(rng.random() < prevalence)
        img = rng.normal(800, 120, (32, 32))
        if label:
            r, c = rng.integers(2, 24, 2)
            img[r : r + 7, c : c + 7] += 900
        _write(root / f"img{i:03d}.dcm", np.clip(img, 0, 4095))
        split = "train" if i % 5 < 3 else ("val" if i % 5 == 3 else "test")
        lines.append(f"img{i:03d}.dcm,{label},{split}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def write_easy_hospitals(
    root: Path, sites: list[tuple[str, int, float]], test_images: int, seed: int
) -> Path:
    """`root/sites/<name>` of (name, images, prevalence), and `root/test`.

    The test folder keeps a mixed split column: every image of --test-data is a test image
    whatever its split says, and the runs using it check exactly that.
    """
    rng = np.random.default_rng(seed)
    for name, n, prevalence in sites:
        write_easy_site(root / "sites" / name, n, prevalence, rng)
    write_easy_site(root / "test", test_images, 0.5, rng)
    return root


@pytest.fixture(scope="session")
def easy_hospitals(tmp_path_factory) -> Path:
    """Three non-IID sites (sizes and prevalence differ) and a balanced test folder."""
    sites = [("site-a", 240, 0.2), ("site-b", 180, 0.5), ("site-c", 120, 0.7)]
    return write_easy_hospitals(tmp_path_factory.mktemp("easy"), sites, 80, seed=0)
