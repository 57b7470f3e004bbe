"""Writing a volume as medfed's readers take it: a DICOM series folder and a 3D NIfTI mask.

A series folder is one row of labels.csv (``common.data.dicom`` stacks its files by position
along the slice normal); its mask is one NIfTI volume on the same grid, written as ITK writes a
DICOM series' label map: voxel axes (column, row, slice), the affine mapping them to RAS
millimetres with ``PixelSpacing``, the slice spacing and the first slice's
``ImagePositionPatient`` (LPS, so x and y flip sign).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID


def write_series(
    folder: Path,
    template: Dataset,
    slices: np.ndarray,
    offsets: np.ndarray,
    thickness: float,
    *,
    store: Callable[[Dataset, np.ndarray], None],
    uid: Callable[[str], UID],
) -> None:
    """Write ``slices`` (S, rows, cols, inferior first) as one DICOM file per slice.

    Args:
        template: the series' header (patient, study, series, frame of reference, geometry of
            the first slice); each file gets its own SOP Instance UID, position and number.
            It is rewritten in place for each slice (a deep copy per slice costs more than
            writing the file) and holds the last slice's values afterwards.
        offsets: each slice's distance (mm) above the first, along the slice normal.
        store: puts a slice's pixels into its dataset (the site's transfer syntax).
        uid: a UID per kind of object, deterministic for the case.

    """
    folder.mkdir(parents=True)
    x0, y0, z0 = (float(v) for v in template.ImagePositionPatient)
    count = len(slices)
    ds = template
    for k, (pixels, offset) in enumerate(zip(slices, offsets, strict=True)):
        ds.SOPInstanceUID = uid(f"instance-{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        number = count - k  # scanners number a chest series from the top down
        ds.InstanceNumber = number
        z = round(z0 + float(offset), 3)
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.3f}"]
        ds.SliceLocation = f"{z:.3f}"
        ds.SliceThickness = f"{thickness:g}"
        ds.SpacingBetweenSlices = f"{thickness:g}"
        store(ds, np.ascontiguousarray(pixels))
        ds.save_as(folder / f"slice_{number:03d}.dcm", enforce_file_format=True)


def mask_volume(labels: np.ndarray, template: Dataset, thickness: float) -> nib.Nifti1Image:
    """A uint8 NIfTI label volume for ``labels`` (S, rows, cols) on the series' grid."""
    dr, dc = (float(s) for s in template.PixelSpacing)
    x0, y0, z0 = (float(v) for v in template.ImagePositionPatient)
    # voxel (column i, row j, slice k) -> RAS: DICOM is LPS with columns along +x, rows +y
    affine = np.array([
        [-dc, 0.0, 0.0, -x0],
        [0.0, -dr, 0.0, -y0],
        [0.0, 0.0, thickness, z0],
        [0.0, 0.0, 0.0, 1.0],
    ])
    img = nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0), dtype=np.uint8), affine)
    img.header.set_xyzt_units("mm")
    return img
