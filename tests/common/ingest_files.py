"""Writers for the awkward real files a hospital archive holds (all written with pydicom/nibabel).

Invalid header values, files without preamble, float pixel data, deflated datasets built as a
stream (so a 12000 x 12000 image stays a few hundred KB on disk and in memory).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from common.data import Preprocess
from tests.common.conftest import make_dataset


def with_raw_values(path: Path, **values: bytes) -> Path:
    """Rewrite the DICOM file at `path` with elements holding raw (possibly invalid) values.

    pydicom refuses to set "1A" on an IS element; a raw element is written as the bytes given,
    which is what a broken exporter produces.
    """
    ds = pydicom.dcmread(path)
    for keyword, raw in values.items():
        tag = Tag(tag_for_keyword(keyword))
        ds.pop(tag, None)
        vr = dictionary_VR(tag)
        ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    ds.save_as(path)
    return path


def file_bytes(ds: pydicom.Dataset) -> bytes:
    """The dataset as a DICOM file (preamble, 'DICM', file meta, dataset)."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def without_preamble(data: bytes, *, keep_meta: bool) -> bytes:
    """Strip the 128-byte preamble and 'DICM'; with keep_meta=False the file meta group too."""
    assert data[128:132] == b"DICM"
    body = data[132:]
    if keep_meta:
        return body
    group_length = struct.unpack("<I", body[8:12])[0]  # (0002,0000) UL comes first
    return body[12 + group_length :]


def float_dataset(pixels: np.ndarray, **attrs: Any) -> pydicom.Dataset:
    """A grey image stored as Float Pixel Data (7FE0,0008), as parametric maps are."""
    ds = make_dataset(np.zeros(pixels.shape, np.uint16), **attrs)
    del ds.PixelData
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation"):
        ds.pop(keyword, None)
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.ascontiguousarray(pixels, dtype="<f4").tobytes()
    return ds


def write_deflated(
    path: Path, rows: int, cols: int, *, pixel_bytes: int | None = None, fill: int = 0
) -> Path:
    """Write a Deflated Explicit VR Little Endian 16-bit grey DICOM of rows x cols.

    The header is encoded by pydicom; the pixel bytes (`pixel_bytes`, default what the header
    declares) stream through zlib in chunks, so neither the writer nor the file needs the
    decoded size. A zero image compresses about 1000:1.
    """
    ds = make_dataset(np.zeros((1, 1), np.uint16))
    ds.Rows, ds.Columns = rows, cols
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    size = rows * cols * 2 if pixel_bytes is None else pixel_bytes
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length.
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        meta = DicomBytesIO()
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        f.write(meta.getvalue())
        f.write(deflater.compress(header.getvalue() + element))
        chunk = bytes([fill]) * 2**20
        left = size
        while left:
            step = min(left, len(chunk))
            f.write(deflater.compress(chunk[:step]))
            left -= step
        f.write(deflater.flush())
    return path


def _dataset_part(data: bytes) -> tuple[bytes, bytes, str]:
    """Split a file into (preamble + file meta, dataset bytes inflated, transfer syntax)."""
    syntax = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.get(
        "TransferSyntaxUID", ""
    ))
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]
    head, body = data[:meta_end], data[meta_end:]
    if syntax == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    return head, body, syntax


def _join(head: bytes, body: bytes, syntax: str) -> bytes:
    if syntax != DeflatedExplicitVRLittleEndian:
        return head + body
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return head + deflater.compress(body) + deflater.flush()


def patch_value(data: bytes, keyword: str, raw: bytes) -> bytes:
    """Replace a short element's value with `raw`, of any length, in the encoded bytes.

    pydicom will not encode a value of the wrong length or an unknown character set, so the
    bytes are edited.
    """
    head, body, syntax = _dataset_part(data)
    implicit = syntax == ImplicitVRLittleEndian
    tag = Tag(tag_for_keyword(keyword))
    at = body.find(struct.pack("<HH", tag.group, tag.element))
    if at < 0:
        return data
    if implicit:
        length = struct.unpack("<I", body[at + 4 : at + 8])[0]
        element = body[at : at + 4] + struct.pack("<I", len(raw)) + raw
        end = at + 8 + length
    else:
        length = struct.unpack("<H", body[at + 6 : at + 8])[0]
        element = body[at : at + 6] + struct.pack("<H", len(raw)) + raw
        end = at + 8 + length
    return _join(head, body[:at] + element + body[end:], syntax)


# Shared by test_data_ingest_edges.py and test_data_ingest_formats.py.
PRE = Preprocess(image_size=16)


def site_with(root, labels_csv, dicom_file, mr, extra):
    """A site with two good training images per class plus `extra` rows (name -> label)."""
    lines = []
    for i in range(4):
        dicom_file(root / f"good{i}.dcm", mr(i))
        lines.append([f"good{i}.dcm", i % 2, "train"])
    lines += [[name, 0, "train"] for name in extra]
    labels_csv(root, lines, header="path,label,split")
    return root


def problems_of(card):
    return {p.path: p.reason for p in card.problems}
