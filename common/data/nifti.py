"""Reading NIfTI volumes (.nii / .nii.gz) into the same RawVolume the DICOM reader produces."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from common.data.errors import ImageError
from common.data.volume import ImageMeta, RawVolume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    """Return True when the file name says NIfTI (.nii or .nii.gz)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path) -> RawVolume:
    """Load a 2D or 3D NIfTI image as slices along its last (superior) axis.

    The image is reoriented to RAS+ first so that every site's volumes share one orientation.
    Each z-plane is then laid out like a radiological DICOM axial slice: rows run anterior to
    posterior and the patient's right is on the left, so rows = y size, cols = x size.
    """
    if not path.exists():
        raise ImageError("file not found; fix the path in labels.csv or restore the file")
    if path.stat().st_size == 0:
        raise ImageError("empty file (0 bytes); export the NIfTI file again")
    try:
        image = nib.load(path)
        if not isinstance(image, nib.spatialimages.SpatialImage):
            raise ImageError("not a NIfTI image; export it again as .nii or .nii.gz")
        shape = tuple(int(n) for n in image.shape)
        # Trailing singleton axes (x, y, z, 1) are common in exports of plain 3D volumes.
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) > 3:
            raise ImageError(
                f"4D NIfTI (shape {'x'.join(map(str, image.shape))}) is not supported; "
                "save each time point or channel as its own 3D file"
            )
        if len(image.shape) == 2:
            # nibabel reorients only 3D arrays; a 2D file is one axial slice (x, y, 1).
            image = nib.Nifti1Image(np.asanyarray(image.dataobj)[..., None], image.affine)
        canonical = nib.as_closest_canonical(image)
        data = np.asarray(canonical.get_fdata(dtype=np.float32))
        data = data.reshape(data.shape[: len(shape)])  # drop the trailing singleton axes
        zooms = tuple(float(z) for z in canonical.header.get_zooms()[:2])
    except ImageError:
        raise
    # nibabel raises many types on truncated or damaged files; all mean "unreadable".
    except Exception as e:
        raise ImageError(f"unreadable NIfTI file ({e}); export it again") from None
    if data.size == 0:
        raise ImageError(f"zero-size image (shape {data.shape}); export it again")
    if data.ndim == 2:
        data = data[:, :, None]
    # (x, y, z) -> (z, y, x), then flip y (anterior on top) and x (patient right on the left).
    slices = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    spacing = (zooms[1], zooms[0]) if len(zooms) == 2 and min(zooms) > 0 else None
    meta = ImageMeta(
        modality=None,
        rows=slices.shape[1],
        cols=slices.shape[2],
        slices=slices.shape[0],
        pixel_spacing=spacing,
        transfer_syntax="NIfTI",
        photometric=None,
    )
    return RawVolume(slices[..., None], meta)
