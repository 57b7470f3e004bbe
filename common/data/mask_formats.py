"""Mask files that are not images of their own: PNG label maps and DICOM SEG objects.

- PNG (2D images only): a uint8 label map, grey or palette, with the image's rows and columns.
  PNG has no geometry, so its pixel grid is the image's own. Image editors save a binary mask
  as 0/255; a PNG holding only those two values reads as 0/1.
- DICOM SEG, through highdicom: the frames that reference the image's SOP Instance UID(s) are
  combined into a label map (segment number = label) on the image's grid, slice for slice in
  the order medfed stacks the image's series. A SEG that references none of the image's
  instances belongs to another image and is refused.

Anything else is left to `read_raw`, as a label image (NIfTI, DICOM label map).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from common.data.alignment import PIXEL_GRID, SEG_REFERENCE
from common.data.dicom import _sorted_slices  # the order the reader stacks a series in
from common.data.errors import ImageError, described
from common.data.nifti import is_nifti
from common.data.volume import ImageMeta, RawVolume

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")
_BINARY_255 = {0, 255}


def read_placed_mask(path: Path, *, image: Path | None) -> tuple[RawVolume, str] | None:
    """Decode a PNG or DICOM SEG mask: (label pixels (S, R, C, 1), how it is placed).

    These formats fix the mask's grid themselves (PNG: the image's pixels; SEG: the referenced
    instances). None for any other file, which `read_raw` decodes and `align_mask` places.
    """
    if _is_png(path):
        return _read_png(path), PIXEL_GRID
    header = _dicom_header(path)
    if header is not None and str(header.get("SOPClassUID", "")) == SegmentationStorage:
        return _read_seg(path, image), SEG_REFERENCE
    return None


def _is_png(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE
    except OSError:
        return False  # read_raw names a missing or unreadable file


def _dicom_header(path: Path) -> Dataset | None:
    if not path.is_file() or is_nifti(path):
        return None
    try:
        # force: older exports lack the preamble, and a SEG among them must still be a SEG
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    # Not DICOM, or damaged: read_raw decides and names what it is.
    except Exception:
        return None


def _read_png(path: Path) -> RawVolume:
    try:
        with Image.open(path) as png:
            mode = png.mode
            if mode not in _PNG_MODES:
                raise ImageError(
                    f"PNG mask in colour mode {mode}; save the labels as a grey (mode L) or "
                    "palette PNG, one integer label per pixel"
                )
            labels = np.asarray(png)  # palette PNGs give their indices: the labels
    except ImageError:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ImageError(f"unreadable PNG mask ({described(e)}); save it again") from None
    labels = labels.astype(np.float32)
    if set(np.unique(labels).tolist()) <= _BINARY_255 and labels.max() == 255:
        labels = labels / 255  # a binary mask as image editors save it
    meta = ImageMeta(modality=None, rows=labels.shape[0], cols=labels.shape[1], slices=1,
                     pixel_spacing=None, transfer_syntax="PNG", photometric=None)
    return RawVolume(labels[None, :, :, None], meta)


def _read_seg(path: Path, image: Path | None) -> RawVolume:
    import highdicom as hd  # imported here: only sites with SEG masks pay for it

    try:
        seg = hd.seg.segread(path)
        referenced = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    except Exception as e:
        raise ImageError(
            f"Segmentation Storage: a DICOM SEG that highdicom cannot read ({described(e)}); "
            "export it again, or convert it to a label map on the image's grid (NIfTI)"
        ) from None
    sources = _source_frames(image)
    wanted = {uid for uid, _ in sources}
    if not referenced & wanted:
        shown = ", ".join(sorted(referenced)[:2]) + (" ..." if len(referenced) > 2 else "")
        raise ImageError(
            f"DICOM SEG {path.name} segments other images (it references {shown or 'none'}), "
            f"not {image.name if image else 'its image'} (SOP Instance UID "
            f"{sources[0][0]}{' ...' if len(sources) > 1 else ''}); list the SEG made from "
            "this image in labels.csv"
        )
    planes = []
    try:
        for uid, frames in sources:
            if frames == 1:
                planes.append(seg.get_pixels_by_source_instance(
                    [uid], combine_segments=True, assert_missing_frames_are_empty=True,
                ))
            else:
                planes.append(seg.get_pixels_by_source_frame(
                    uid, source_frame_numbers=list(range(1, frames + 1)),
                    combine_segments=True, assert_missing_frames_are_empty=True,
                ))
    except Exception as e:
        raise ImageError(
            f"DICOM SEG {path.name} cannot be mapped onto its image ({described(e)}); export "
            "it again from this image, without overlapping segments"
        ) from None
    labels = np.concatenate(planes).astype(np.float32)
    meta = ImageMeta(modality="SEG", rows=labels.shape[1], cols=labels.shape[2],
                     slices=labels.shape[0], pixel_spacing=None, transfer_syntax="DICOM SEG",
                     photometric=None)
    return RawVolume(labels[..., None], meta)


def _source_frames(image: Path | None) -> list[tuple[str, int]]:
    """(SOP Instance UID, frames) of the image's files, in the order the reader stacks them."""
    if image is None:
        raise ImageError("a DICOM SEG mask needs its DICOM image to be mapped onto")
    files = sorted(p for p in image.iterdir() if p.is_file() and not p.name.startswith(".")) \
        if image.is_dir() else [image]
    headers: list[tuple[Path, Dataset]] = []
    for file in files:
        try:
            headers.append((file, pydicom.dcmread(file, stop_before_pixels=True)))
        except Exception:
            continue  # the image reader skips (and reports) files that are not DICOM
    found = [
        (str(ds.SOPInstanceUID), int(ds.get("NumberOfFrames") or 1))
        for _, ds in _sorted_slices(headers) if "SOPInstanceUID" in ds
    ]
    if not found:
        raise ImageError(
            f"a DICOM SEG mask needs a DICOM image; {image.name} has no SOP Instance UID "
            "(a NIfTI image takes a NIfTI or PNG mask)"
        )
    return found
