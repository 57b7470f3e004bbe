"""Image-mask pairs in real formats for the mask alignment tests.

Radiographs come from the phantoms `medfed synth` draws (simulations.phantom), with the lungs
as the mask: two nearly mirror-image fields, the case a content check must not call flipped.
Masks are written the way hospital tools write them: SimpleITK for NIfTI (a 2D image in ITK's
default frame: array (Columns, Rows), affine diag(-1, -1, 1)), Pillow for PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from scipy import ndimage

from simulations.phantom import Grid, Scanner, TissueValues, acquire, sample_phantom
from tests.common.conftest import make_dataset

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
# The radiograph tissues of simulations.synth (attenuation, brighter = denser).
XR_TISSUES = TissueValues(
    air=0.0, fat=0.5, soft=0.55, lung=0.22, heart=0.78, bone=0.88, vessel=0.3, lesion=0.55
)


def chest_radiograph(
    seed: int, rows: int = 160, cols: int = 128, spacing: float = 2.6
) -> tuple[np.ndarray, np.ndarray]:
    """A frontal phantom radiograph (uint16) and its lung mask (uint8, 1 = lung)."""
    rng = np.random.default_rng(seed)
    grid = Grid(rows, cols, (spacing, spacing))
    scanner = Scanner("frontal", grid, XR_TISSUES, 1.5, 0.02, 0.01, 0.08)
    phantom = sample_phantom(rng, "frontal", lesion=False)
    image, _ = acquire(phantom, scanner, rng)
    ys, xs = grid.axes()
    cover = np.maximum.reduce(
        [lung.coverage(xs[None, :], ys[:, None], spacing) for lung in phantom.lungs]
    )
    stored = np.clip(image / max(float(image.max()), 1e-6) * 4000, 0, 4095).astype(np.uint16)
    return stored, (cover >= 0.5).astype(np.uint8)


def write_radiograph(path: Path, pixels: np.ndarray, spacing: float = 2.6) -> Path:
    """A DX image with no patient frame (no Image Position/Orientation), as radiographs are."""
    ds = make_dataset(pixels, modality="DX", ImagerPixelSpacing=[spacing, spacing],
                      PatientOrientation=["L", "F"])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_itk_mask(path: Path, mask: np.ndarray, spacing: float = 2.6) -> Path:
    """Write a (Rows, Columns) mask with SimpleITK, as ITK writes a 2D slice's label map."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    image.SetSpacing((spacing, spacing))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def write_seg(path: Path, source: Path, labels: np.ndarray) -> Path:
    """A DICOM SEG made with highdicom from the image `source`: segment k where labels == k."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ds = pydicom.dcmread(source)
    # Attributes highdicom copies from the source into the SEG (Patient and Study modules).
    for keyword, value in (("PatientID", "TEST"), ("PatientName", "TEST^MASK"),
                           ("PatientBirthDate", ""), ("PatientSex", ""), ("StudyDate", ""),
                           ("StudyTime", ""), ("StudyID", "1"), ("AccessionNumber", ""),
                           ("ReferringPhysicianName", ""), ("SeriesNumber", 1),
                           ("InstanceNumber", 1)):
        if keyword not in ds:
            setattr(ds, keyword, value)
    if "StudyInstanceUID" not in ds:
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    segments = sorted(int(v) for v in np.unique(labels) if v > 0)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=f"structure {n}",
            segmented_property_category=codes.SCT.Organ, segmented_property_type=codes.SCT.Lung,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n in segments
    ]
    stacked = np.stack([labels == n for n in segments], axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=[ds], pixel_array=stacked[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medfed tests",
        manufacturer_model_name="tests", software_versions="1", device_serial_number="1",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def fundus_photo(seed: int, side: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A retina-like grey photograph (uint8) with a dark vessel tree, and the vessel mask.

    Vessels are 1-5 pixels wide, branching from an off-centre optic disc: the thin structures
    whose masks a content check must not misjudge.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side].astype(np.float64)
    centre = side / 2
    field = ((yy - centre) ** 2 + (xx - centre) ** 2) < (0.45 * side) ** 2
    disc_x, disc_y = centre + 0.18 * side, centre
    image = field * (0.6 + 0.3 * np.exp(-((yy - disc_y) ** 2 + (xx - disc_x) ** 2)
                                        / (2 * (0.05 * side) ** 2)))
    vessels = np.zeros((side, side), dtype=bool)
    for _ in range(10):
        angle, x, y = rng.uniform(0, 2 * np.pi), disc_x, disc_y
        width = rng.uniform(1.0, 2.5)
        for step in range(side // 2):
            angle += rng.normal(0, 0.08)
            x, y = x + np.cos(angle), y + np.sin(angle)
            if not (0 <= x < side and 0 <= y < side):
                break
            radius = max(width * (1 - step / (side * 0.6)), 0.7)
            near = slice(max(int(y) - 3, 0), int(y) + 4), slice(max(int(x) - 3, 0), int(x) + 4)
            vessels[near] |= (yy[near] - y) ** 2 + (xx[near] - x) ** 2 <= radius**2
    vessels &= field
    image = np.where(vessels, image - 0.25, image)
    image = ndimage.gaussian_filter(image, 0.8) + 0.02 * rng.standard_normal((side, side))
    scaled = (image - image.min()) / (image.max() - image.min()) * 255
    return scaled.astype(np.uint8), vessels.astype(np.uint8)
