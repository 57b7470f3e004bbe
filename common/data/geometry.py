"""Where an image's pixels lie in the patient, so that a mask can be placed on its image.

The readers hand back pixels only: a mask with the image's rows and columns but another
orientation (rotated 180 degrees, say) would be trained on as if it covered the image.
`common.data.alignment` uses these grids to resample a mask onto its image where both headers
carry a patient frame, as ITK's resampler does, and to describe a mismatch where they do not.

Positions are LPS millimetres (DICOM's patient frame; NIfTI's RAS is flipped in x and y), in the
layout the readers produce: (slice, row, column), a NIfTI file reoriented as `read_nifti` does.
Only headers are read (pixel data never), so the check is cheap next to decoding.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from nibabel.orientations import inv_ornt_aff, io_orientation
from pydicom.dataset import Dataset

from common.data.nifti import is_nifti

# A coordinate may be off by this share of a pixel (DICOM stores positions as rounded decimal
# strings), a spacing by this relative amount, and a direction cosine by this much.
_POSITION_TOLERANCE = 0.25
_SPACING_TOLERANCE = 1e-3
_DIRECTION_TOLERANCE = 1e-3
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])
_AXIS_NAMES = (("R", "L"), ("A", "P"), ("I", "S"))  # LPS: +x is L, +y is P, +z is S


@dataclass(frozen=True, eq=False)
class Grid:
    """The sampling grid of a decoded image.

    spacing: (row, column) spacing in mm, None when the header has none.
    origin: LPS mm of the first pixel of the first slice; None without a patient frame
        (a radiograph, a NIfTI file without qform/sform), in which case only spacing is known.
    row_step / col_step: LPS mm vector from a pixel to the next row / the next column.
    last_origin: LPS mm of the first pixel of the last slice (None for one slice).
    slice_step: LPS mm vector from a slice to the next (one slice: the normal, one slice
        thickness long, so that a point can be placed in or out of the slice's slab).
    """

    spacing: tuple[float, float] | None
    origin: np.ndarray | None = None
    row_step: np.ndarray | None = None
    col_step: np.ndarray | None = None
    last_origin: np.ndarray | None = None
    slice_step: np.ndarray | None = None

    def index_to_lps(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(origin, 3x3 matrix) mapping a (slice, row, column) index to LPS mm; None unframed."""
        steps = (self.slice_step, self.row_step, self.col_step)
        if self.origin is None or any(step is None for step in steps):
            return None
        matrix = np.column_stack([np.asarray(step, dtype=np.float64) for step in steps])
        # A header whose directions are parallel (or zero) places no pixel anywhere.
        if abs(np.linalg.det(matrix)) < 1e-9:
            return None
        return np.asarray(self.origin, dtype=np.float64), matrix


def grid_mismatch(mask: Grid | None, image: Grid | None) -> str | None:
    """Say how `mask`'s grid differs from `image`'s, or None when it matches."""
    if mask is None or image is None:
        return None
    if mask.spacing is not None and image.spacing is not None:
        if not np.allclose(mask.spacing, image.spacing, rtol=_SPACING_TOLERANCE, atol=1e-6):
            return (
                f"pixel spacing: mask {_pair(mask.spacing)} mm, image {_pair(image.spacing)} mm"
            )
    if (
        mask.origin is None or image.origin is None or mask.row_step is None
        or image.row_step is None or mask.col_step is None or image.col_step is None
    ):
        return None
    if not (
        _same_direction(mask.row_step, image.row_step)
        and _same_direction(mask.col_step, image.col_step)
    ):
        return (
            f"orientation: mask rows run toward {_toward(mask.row_step)} and columns toward "
            f"{_toward(mask.col_step)}, image rows toward {_toward(image.row_step)} and "
            f"columns toward {_toward(image.col_step)}"
        )
    pixel = float(min(np.linalg.norm(image.row_step), np.linalg.norm(image.col_step)))
    tolerance = _POSITION_TOLERANCE * pixel if pixel > 0 else 1e-3
    for name, have, want in (
        ("first pixel", mask.origin, image.origin),
        ("last slice's first pixel", mask.last_origin, image.last_origin),
    ):
        if have is not None and want is not None and np.linalg.norm(have - want) > tolerance:
            return f"{name}: mask at {_point(have)} mm, image at {_point(want)} mm (LPS)"
    return None


def grid_of(path: Path) -> Grid | None:
    """The grid of a NIfTI file, DICOM file or DICOM series folder; None if it cannot be told.

    Cached by (path, size, modification time): a segmentation run checks every mask each round.
    """
    try:
        stat = path.stat()
    except OSError:
        return None
    return _cached_grid(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _cached_grid(path: str, size: int, mtime_ns: int) -> Grid | None:
    file = Path(path)
    # The decoder has already read these files; a header that cannot be read here is a file
    # the decoder reported already, or one this check cannot judge: either way, compare nothing.
    try:
        if is_nifti(file):
            return _nifti_grid(file)
        if file.is_dir():
            return _series_grid(file)
        return _dicom_grid(pydicom.dcmread(file, stop_before_pixels=True, force=True))
    except Exception:
        return None


def _nifti_grid(path: Path) -> Grid:
    image = nib.load(path)
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is a subclass
        raise TypeError(f"{path} is not a NIfTI image")
    shape = tuple(int(n) for n in image.shape[:3]) + (1,) * max(0, 3 - len(image.shape))
    header = image.header
    framed = int(header["sform_code"]) > 0 or int(header["qform_code"]) > 0
    affine = np.array(image.affine, dtype=np.float64)
    # read_nifti reorients to RAS (nib.as_closest_canonical) and then lays each z-plane out
    # as rows = y reversed, columns = x reversed: pixel (s, r, c) is voxel (X-1-c, Y-1-r, s).
    ornt = io_orientation(affine)
    canonical = affine @ inv_ornt_aff(ornt, shape)
    size = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        size[int(target)] = shape[axis]
    x, y, z = size
    ras_to_lps = np.append(_LPS_TO_RAS, 1.0)
    origin = (canonical @ np.array([x - 1, y - 1, 0, 1.0]) * ras_to_lps)[:3]
    col_step = -canonical[:3, 0] * _LPS_TO_RAS
    row_step = -canonical[:3, 1] * _LPS_TO_RAS
    spacing = (float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step)))
    if not framed or _itk_slice_frame(image.shape, affine):
        return Grid(spacing)
    last = (canonical @ np.array([x - 1, y - 1, z - 1, 1.0]) * ras_to_lps)[:3] if z > 1 else None
    slice_step = canonical[:3, 2] * _LPS_TO_RAS  # read_nifti keeps the z order
    return Grid(spacing, origin, row_step, col_step, last, slice_step)


def _itk_slice_frame(shape: tuple[int, ...], affine: np.ndarray) -> bool:
    """Whether a one-slice NIfTI file carries ITK's default 2D frame, which says nothing.

    ITK (and SimpleITK) write a 2D image, such as a mask drawn on one DICOM slice, with the
    identity direction (LPS; RAS diag(-1, -1, 1)) and an in-plane origin, whatever the slice's
    orientation in the patient: a sagittal slice's mask gets the same frame as an axial one's.
    Such a frame is no evidence of misalignment, so only the spacing is compared.
    """
    one_slice = len(shape) == 2 or (len(shape) >= 3 and int(shape[2]) == 1)
    directions = affine[:3, :3] / np.maximum(np.linalg.norm(affine[:3, :3], axis=0), 1e-12)
    return one_slice and bool(np.allclose(directions, np.diag(_LPS_TO_RAS), atol=1e-6))


def _dicom_grid(ds: Dataset) -> Grid:
    spacing = _floats(_attribute(ds, "PixelSpacing", "PixelMeasuresSequence"), 2)
    if spacing is None:
        spacing = _floats(ds.get("ImagerPixelSpacing"), 2)  # radiographs: no patient frame
    orientation = _floats(
        _attribute(ds, "ImageOrientationPatient", "PlaneOrientationSequence"), 6
    )
    positions = _frame_positions(ds)
    if spacing is None or orientation is None or not positions:
        return Grid(None if spacing is None else (spacing[0], spacing[1]))
    row_step = np.array(orientation[3:]) * spacing[0]  # next row: along the column cosines
    col_step = np.array(orientation[:3]) * spacing[1]
    last = np.array(positions[-1]) if len(positions) > 1 else None
    slice_step = _slice_step(ds, row_step, col_step, positions)
    return Grid((spacing[0], spacing[1]), np.array(positions[0]), row_step, col_step, last,
                slice_step)


def _slice_step(
    ds: Dataset, row_step: np.ndarray, col_step: np.ndarray, positions: list[list[float]]
) -> np.ndarray:
    """Frame to frame in LPS mm; for one frame, the normal one slice thickness long."""
    if len(positions) > 1:
        return (np.array(positions[-1]) - np.array(positions[0])) / (len(positions) - 1)
    normal = np.cross(col_step, row_step)
    normal = normal / max(float(np.linalg.norm(normal)), 1e-12)
    thickness = _floats([ds.get("SliceThickness") or ds.get("SpacingBetweenSlices")], 1)
    # Without a thickness, a slice is taken as thick as its pixels are wide.
    depth = thickness[0] if thickness and thickness[0] > 0 else float(
        max(np.linalg.norm(row_step), np.linalg.norm(col_step))
    )
    return normal * depth


def _series_grid(folder: Path) -> Grid | None:
    """A series folder's grid: its slices ordered along the normal, as the reader stacks them."""
    grids = []
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            grids.append(_dicom_grid(pydicom.dcmread(file, stop_before_pixels=True)))
        except Exception:
            continue  # not DICOM: the reader skips (and reports) it too
    if not grids:
        return None
    first = grids[0]
    if first.origin is None or first.row_step is None or first.col_step is None:
        return Grid(first.spacing)
    normal = np.cross(first.col_step, first.row_step)
    framed = [g.origin for g in grids if g.origin is not None]
    ordered = sorted(framed, key=lambda origin: float(np.dot(origin, normal)))
    last = ordered[-1] if len(ordered) > 1 else None
    step = (last - ordered[0]) / (len(ordered) - 1) if last is not None else first.slice_step
    return Grid(first.spacing, ordered[0], first.row_step, first.col_step, last, step)


def _frame_positions(ds: Dataset) -> list[list[float]]:
    """ImagePositionPatient of each frame (enhanced multi-frame: per-frame groups)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        positions = []
        for item in per_frame:
            plane = item.get("PlanePositionSequence")
            value = _floats(plane[0].get("ImagePositionPatient"), 3) if plane else None
            if value is None:
                return []
            positions.append(value)
        return positions
    value = _floats(ds.get("ImagePositionPatient"), 3)
    return [value] if value is not None else []


def _attribute(ds: Dataset, keyword: str, sequence: str) -> Any:
    """`keyword` from the dataset, else from the shared functional groups' `sequence`."""
    if keyword in ds:
        return ds.get(keyword)
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(groups)
        if items and items[0].get(sequence):
            return items[0].get(sequence)[0].get(keyword)
    return None


def _floats(value: Any, count: int) -> list[float] | None:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def _same_direction(a: np.ndarray, b: np.ndarray) -> bool:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return bool(na > 0 and nb > 0 and np.dot(a / na, b / nb) > 1 - _DIRECTION_TOLERANCE)


def _toward(step: np.ndarray) -> str:
    """The patient direction a step points to most: L/R, P/A or S/I (oblique: the largest)."""
    axis = int(np.argmax(np.abs(step)))
    return _AXIS_NAMES[axis][1 if step[axis] > 0 else 0]


def _pair(values: tuple[float, float]) -> str:
    return f"{values[0]:.4g}x{values[1]:.4g}"


def _point(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"
