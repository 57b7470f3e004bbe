"""Reading a DICOM file's header and refusing, before any decoding, what cannot be an image.

Not DICOM (named by its real format), not an image (by SOP class), invalid geometry values,
more than the decoded-size cap, a deflated dataset that inflates past its header: all become an
ImageError here, with the file's pixel data untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_description
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from common.data.deflate import check_deflated
from common.data.errors import ImageError, described
from common.data.limits import check_decoded_size, pixels_declared
from common.data.sniff import describe_non_dicom
from common.data.sop import is_image_class, refuse_non_image, sop_class_name

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Elements that a bare dataset parsed without a preamble must hold to be taken as DICOM.
_DICOM_EVIDENCE = ("SOPClassUID", "Rows", "Columns", *PIXEL_KEYWORDS)
_BITS_ALLOCATED = (1, 8, 16, 32, 64)
# (implicit VR, little endian) -> the native transfer syntax with that encoding
_SYNTAX_BY_ENCODING: dict[tuple[bool | None, bool | None], UID] = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


def read_header(path: Path, *, as_labels: bool = False) -> Dataset:
    """Parse a DICOM file that should hold an image; pixel data is checked but not decoded.

    Everything that can refuse a file without decoding it runs here: not DICOM, not an image
    (by SOP class), invalid geometry, and the decoded-size cap.
    """
    if not path.exists():
        raise ImageError("file not found; fix the path in labels.csv or restore the file")
    size = path.stat().st_size
    if size == 0:
        raise ImageError("empty file (0 bytes); re-export it from the PACS")
    check_deflated(path)  # before pydicom inflates a deflated dataset without a bound
    try:
        ds: Dataset = pydicom.dcmread(path)
    except InvalidDicomError:
        ds = _read_without_preamble(path)
    # pydicom raises many exception types on damaged headers; any of them means unreadable.
    except Exception as e:
        raise ImageError(f"unreadable DICOM header ({described(e)}); re-export the file") from None
    try:
        _inspect(ds, size, as_labels=as_labels)
    except ImageError:
        raise
    # pydicom parses element values lazily: a damaged one (an unknown VR, a value of the wrong
    # length) raises only when the checks above read it.
    except Exception as e:
        raise ImageError(f"unreadable DICOM header ({described(e)}); re-export the file") from None
    return ds


def _inspect(ds: Dataset, size: int, *, as_labels: bool) -> None:
    """Refuse, by its header alone, a DICOM object that cannot be decoded as an image."""
    refuse_non_image(ds, as_labels=as_labels)
    if not any(tag in ds for tag in PIXEL_KEYWORDS):
        kind = sop_class_name(ds)
        if kind is not None and is_image_class(kind):
            raise ImageError(
                f"no pixel data in this {kind} object ({size:,} bytes): the file is probably "
                "truncated or its header damaged; copy or export it again"
            )
        raise ImageError(
            f"no pixel data: this DICOM {kind or 'object'} holds no image; "
            "remove it from labels.csv"
        )
    rows, cols, frames, samples = _geometry(ds)
    check_decoded_size(
        (rows, cols, frames, samples),
        file_bytes=size,
        what=pixels_declared(rows, cols, frames, samples),
    )
    if "PhotometricInterpretation" not in ds:
        raise ImageError("missing Photometric Interpretation (0028,0004); re-export the file")
    str(ds.PhotometricInterpretation)  # parse it now, so a damaged value reads as a header error


def _read_without_preamble(path: Path) -> Dataset:
    """Accept DICOM written without the 128-byte preamble and 'DICM' (older exports).

    The file is parsed as a bare dataset; it is taken as DICOM when that yields the elements
    every DICOM object or image has, and refused with its real format named otherwise.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
        parsed = any(keyword in ds for keyword in _DICOM_EVIDENCE)
    # Forcing a parse of a text or JPEG file fails in arbitrary ways; all mean "not DICOM".
    except Exception:
        parsed = False
    if not parsed:
        raise ImageError(describe_non_dicom(path))
    if "TransferSyntaxUID" not in ds.file_meta:
        # The decoders need a transfer syntax; take the encoding the reader detected.
        ds.file_meta.TransferSyntaxUID = _SYNTAX_BY_ENCODING.get(
            ds.original_encoding, ExplicitVRLittleEndian
        )
    return ds


def _geometry(ds: Dataset) -> tuple[int, int, int, int]:
    """Return (rows, columns, frames, samples per pixel), refusing values no decoder can use.

    Header values are checked here, by name, because pydicom keeps an invalid IS/DS value
    (NumberOfFrames "1A") as a string that later fails deep inside a decoder.
    """
    rows, cols = _whole(ds, "Rows"), _whole(ds, "Columns")
    if rows == 0 or cols == 0:
        raise ImageError(f"zero-size image (Rows={rows}, Columns={cols}); re-export the file")
    frames = _whole(ds, "NumberOfFrames", default=1) or 1  # 0 is written for single frames
    samples = _whole(ds, "SamplesPerPixel", default=1)
    if samples not in (1, 3):
        raise ImageError(
            f"Samples per Pixel (0028,0002) is {samples}; medfed reads grey (1) or colour (3)"
        )
    bits = _whole(ds, "BitsAllocated", default=None)
    if bits not in _BITS_ALLOCATED:
        raise ImageError(
            f"Bits Allocated (0028,0100) is {bits}; DICOM images use 1, 8, 16, 32 or 64, "
            "re-export the file"
        )
    return rows, cols, frames, samples


def _whole(ds: Dataset, keyword: str, *, default: int | None = None) -> int:
    """Return an integer header value, or raise ImageError naming the element and its value."""
    tag = Tag(keyword)
    where = f"{dictionary_description(tag)} ({tag.group:04X},{tag.element:04X})"
    try:
        value = ds.get(keyword)
    # A value of the wrong length for its VR raises when pydicom converts it.
    except Exception as e:
        raise ImageError(f"unreadable {where} ({described(e)}); export the file again") from None
    if value is None or value == "":
        if default is None:
            raise ImageError(f"missing {where}; re-export the file")
        return default
    try:
        if isinstance(value, list | tuple | MultiValue | bytes):
            raise TypeError(value)
        number = int(value)
        if number != float(value) or number < 0:
            raise ValueError(value)
    except (TypeError, ValueError, OverflowError):
        raise ImageError(
            f"invalid {where} value {shown(value)}; the header is damaged, export the file again"
        ) from None
    return number


def shown(value: Any) -> str:
    """Return a header value as a message quotes it: repr, cut to 40 characters."""
    text = repr(value if isinstance(value, int | float | str | bytes) else str(value))
    return text if len(text) <= 40 else text[:40] + "..."


def transfer_syntax(ds: Dataset) -> UID:
    """Return the dataset's transfer syntax UID."""
    return UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
