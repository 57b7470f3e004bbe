"""Reading NIfTI and the other volume formats nibabel reads into the RawVolume DICOM produces.

NIfTI (.nii, .nii.gz), NIfTI/Analyze 7.5 pairs (.hdr + .img) and FreeSurfer MGH (.mgh, .mgz)
are read; MINC, PAR/REC and AFNI are tried through nibabel too and named when that fails.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from common.data.errors import ImageError, described
from common.data.limits import check_decoded_size
from common.data.volume import ImageMeta, RawVolume

# suffix -> format name for messages; ".gz"/".bz2" may follow a pair's suffix (nibabel reads it).
VOLUME_SUFFIXES = {
    ".nii": "NIfTI",
    ".hdr": "Analyze",
    ".img": "Analyze",
    ".mgh": "MGH",
    ".mgz": "MGH",
    ".mnc": "MINC",
    ".par": "PAR/REC",
    ".rec": "PAR/REC",
    ".head": "AFNI",
    ".brik": "AFNI",
}
_COMPRESSED = (".gz", ".bz2")
# What the card's "transfer syntaxes" line shows per nibabel class.
_FORMAT_BY_CLASS = {
    "Nifti1Image": "NIfTI",
    "Nifti2Image": "NIfTI-2",
    "Nifti1Pair": "NIfTI pair",
    "Nifti2Pair": "NIfTI-2 pair",
    "AnalyzeImage": "Analyze",
    "Spm2AnalyzeImage": "Analyze",
    "Spm99AnalyzeImage": "Analyze",
    "MGHImage": "MGH",
    "Minc1Image": "MINC",
    "Minc2Image": "MINC",
    "PARRECImage": "PAR/REC",
    "AFNIImage": "AFNI",
}
_PAIRS = {".hdr": ".img", ".img": ".hdr"}


def volume_format(path: Path) -> str | None:
    """Return the volume format a file name says (e.g. "NIfTI", "Analyze"), else None."""
    name = path.name.lower()
    for extra in _COMPRESSED:
        if name.endswith(extra):
            name = name[: -len(extra)]
            break
    return VOLUME_SUFFIXES.get(Path(name).suffix)


def is_nifti(path: Path) -> bool:
    """Return True when the file name says a format nibabel reads (NIfTI, Analyze, MGH, ...)."""
    return volume_format(path) is not None


def read_nifti(path: Path) -> RawVolume:
    """Load a 2D or 3D volume as slices along its last (superior) axis.

    The image is reoriented to RAS+ first so that every site's volumes share one orientation.
    Each z-plane is then laid out like a radiological DICOM axial slice: rows run anterior to
    posterior and the patient's right is on the left, so rows = y size, cols = x size.
    """
    kind = volume_format(path) or "NIfTI"
    if not path.exists():
        raise ImageError("file not found; fix the path in labels.csv or restore the file")
    if path.stat().st_size == 0:
        raise ImageError(f"empty file (0 bytes); export the {kind} file again")
    _check_pair(path, kind)
    try:
        image = nib.load(path)
        if not isinstance(image, nib.spatialimages.SpatialImage):
            raise ImageError(f"not a {kind} image volume; export it again as .nii or .nii.gz")
        kind = _FORMAT_BY_CLASS.get(type(image).__name__, kind)
        shape = tuple(int(n) for n in image.shape)
        # Before any voxel is read: a header can declare far more than the file holds.
        check_decoded_size(
            shape,
            file_bytes=path.stat().st_size,
            what=f"{kind} header shape {'x'.join(map(str, shape))}",
        )
        # Trailing singleton axes (x, y, z, 1) are common in exports of plain 3D volumes.
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) > 3:
            raise ImageError(
                f"4D {kind} (shape {'x'.join(map(str, image.shape))}) is not supported; "
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
        raise ImageError(f"unreadable {kind} file ({described(e)}); export it again") from None
    if data.size == 0:
        raise ImageError(f"zero-size image (shape {data.shape}); export it again")
    if data.ndim == 2:
        data = data[:, :, None]
    # (x, y, z) -> (z, y, x), then flip y (anterior on top) and x (patient right on the left).
    slices = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    usable = len(zooms) == 2 and np.isfinite(zooms).all() and min(zooms) > 0
    meta = ImageMeta(
        modality=None,
        rows=slices.shape[1],
        cols=slices.shape[2],
        slices=slices.shape[0],
        pixel_spacing=(zooms[1], zooms[0]) if usable else None,
        transfer_syntax=kind,
        photometric=None,
    )
    return RawVolume(slices[..., None], meta)


def _check_pair(path: Path, kind: str) -> None:
    """An Analyze/NIfTI pair needs both files; name the missing one instead of nibabel's error."""
    suffix = Path(path.name.lower().removesuffix(".gz").removesuffix(".bz2")).suffix
    other = _PAIRS.get(suffix)
    if other is None:
        return
    stem = path.name[: path.name.lower().rindex(suffix)]
    candidates = [path.with_name(stem + case) for case in (other, other.upper())]
    candidates += [c.with_name(c.name + extra) for c in candidates for extra in _COMPRESSED]
    if not any(c.exists() for c in candidates):
        raise ImageError(
            f"{kind} image needs both {stem}.hdr and {stem}.img; {stem}{other} is missing, "
            "copy it next to this file"
        )
