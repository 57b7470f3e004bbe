"""A bound on Deflated Explicit VR Little Endian files, checked before pydicom inflates them.

pydicom 3.0 (`filereader.read_partial`) inflates the whole dataset of a deflated file with one
unbounded `zlib.decompress(fileobj.read())` before it parses a single element, so a 281 KB file
declaring 12000 x 12000 pixels costs its full decoded size before any header check can run.
Here the stream is inflated in chunks and thrown away: the first few MiB give the header
(rows, columns, frames, samples), which is checked against the image cap, and the rest must end
within what that header declares. Only then may pydicom inflate it.
"""

from __future__ import annotations

import io
import math
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from common.data.errors import ImageError
from common.data.limits import check_decoded_size, max_image_bytes, pixels_declared

MIB = 2**20
# Group 0028 (image geometry) precedes pixel data; a header beyond 4 MiB is already absurd.
HEAD_BYTES = 4 * MIB
# Elements that may follow pixel data (trailing padding, digital signatures).
TRAILING_BYTES = 1 * MIB
_CHUNK = 64 * 1024
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # float, double float, pixel data


def check_deflated(path: Path) -> None:
    """Raise ImageError if a deflated DICOM file declares or inflates past the image cap.

    Files with any other transfer syntax (or no readable file meta) return at once; pydicom's
    own read reports what is wrong with those.
    """
    with path.open("rb") as fp:
        if not _is_deflated(fp):
            return
        file_bytes = path.stat().st_size
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        head = bytearray()
        limit: int | None = None
        total = 0
        try:
            for out in _inflated(fp, inflater):
                total += len(out)
                if limit is None:
                    head += out
                    if len(head) >= HEAD_BYTES:
                        limit = _limit(bytes(head), file_bytes)
                if limit is not None and total > limit:
                    raise ImageError(
                        f"deflated dataset inflates past the {limit:,} bytes its header "
                        f"declares (file {file_bytes:,} bytes on disk); refused before decoding "
                        "(damaged or crafted file), export it again"
                    )
        except zlib.error as e:
            raise ImageError(
                f"damaged deflate stream ({e}); the copy is broken, export the file again"
            ) from None
        if limit is None:
            _limit(bytes(head), file_bytes)  # small stream: still check what it declares


def _is_deflated(fp: BinaryIO) -> bool:
    """Read preamble and file meta; leave `fp` at the dataset and say if it is deflated."""
    try:
        read_preamble(fp, force=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = read_dataset(fp, False, True, stop_when=_past_file_meta)
        return str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian
    # Not parseable as DICOM at all: the real read that follows names the problem.
    except Exception:
        return False


def _past_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 0x0002


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


def _inflated(fp: BinaryIO, inflater: zlib._Decompress) -> Iterator[bytes]:
    """Yield the inflated stream in chunks of at most 1 MiB, never holding more."""
    while not inflater.eof:
        data = inflater.unconsumed_tail or fp.read(_CHUNK)
        if not data:
            return  # a truncated stream: pydicom's read reports it
        yield inflater.decompress(data, MIB)


def _limit(head: bytes, file_bytes: int) -> int:
    """Check the header inside `head` against the cap; return the most the stream may inflate to."""
    stream = io.BytesIO(head)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a head cut inside an element is expected here
            header: Dataset = read_dataset(stream, False, True, stop_when=_at_pixel_data)
        geometry = _declared(header)
    # An unparseable header gets the cap as its bound; the real read then names the problem.
    except Exception:
        geometry = None
    if geometry is None:
        return max_image_bytes() + TRAILING_BYTES
    rows, cols, frames, samples, bits = geometry
    check_decoded_size(
        (rows, cols, frames, samples),
        file_bytes=file_bytes,
        what=pixels_declared(rows, cols, frames, samples),
    )
    pixel_bytes = math.ceil(rows * cols * frames * samples * bits / 8)
    return stream.tell() + 12 + pixel_bytes + TRAILING_BYTES


def _declared(header: Dataset) -> tuple[int, int, int, int, int] | None:
    """(rows, columns, frames, samples, bits allocated) if the header states them plainly."""
    if "Rows" not in header or "Columns" not in header:
        return None
    values = (
        header.Rows,
        header.Columns,
        header.get("NumberOfFrames") or 1,
        header.get("SamplesPerPixel") or 1,
        header.get("BitsAllocated") or 16,
    )
    numbers = tuple(int(v) for v in values)  # invalid values raise: handled by the caller
    if min(numbers) < 1:
        return None
    rows, cols, frames, samples, bits = numbers
    return rows, cols, frames, samples, bits
