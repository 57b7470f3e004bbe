"""Naming a file that is not DICOM by its first bytes, so the card says what it actually is."""

from __future__ import annotations

from pathlib import Path

READABLE = "medfed reads DICOM, NIfTI (.nii, .nii.gz), Analyze (.hdr/.img) and MGH (.mgh, .mgz)"
# (offset, signature, what the file is, what to do with it)
_CONVERT = f"{READABLE}: convert it to one of these or remove it from labels.csv"
_REMOVE = "not an image; remove it from labels.csv"
_SIGNATURES = (
    (344, b"n+1\x00", "a NIfTI-1 file", "rename it to end in .nii so it is read as NIfTI"),
    (344, b"ni1\x00", "a NIfTI-1 header", "rename the pair to .hdr/.img so it is read as NIfTI"),
    (4, b"n+2\x00", "a NIfTI-2 file", "rename it to end in .nii so it is read as NIfTI"),
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image", _CONVERT),
    (0, b"\xff\xd8\xff", "a JPEG image", _CONVERT),
    (0, b"II*\x00", "a TIFF image", _CONVERT),
    (0, b"MM\x00*", "a TIFF image", _CONVERT),
    (0, b"GIF8", "a GIF image", _CONVERT),
    (0, b"NRRD", "an NRRD volume", _CONVERT),
    (0, b"ObjectType", "a MetaImage header (.mhd)", _CONVERT),
    (0, b"\x89HDF", "an HDF5 file", _CONVERT),
    (0, b"\x1f\x8b", "a gzip archive", "decompress it, or name a gzipped NIfTI .nii.gz"),
    (0, b"PK\x03\x04", "a ZIP archive", "unpack it and list the images it holds"),
    (0, b"%PDF", "a PDF document", _REMOVE),
)
_HEAD = 512


def describe_non_dicom(path: Path) -> str:
    """Return the reason a file that no DICOM reading accepted is refused, naming its format."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(_HEAD)
    for offset, signature, kind, fix in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return f"not a DICOM file ({kind}, {size:,} bytes); {fix}"
    if _looks_like_text(head):
        return f"not a DICOM file (text, {size:,} bytes); {_REMOVE}"
    return (
        f"not a DICOM file (no 'DICM' marker and no DICOM dataset, {size:,} bytes); "
        f"{READABLE}: export the image as one of these or remove it"
    )


def has_dicm_marker(path: Path) -> bool:
    """True when bytes 128-131 read 'DICM' (the DICOM file format's own signature)."""
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    # Ignoring undecodable bytes keeps a character cut at the 512-byte edge from counting.
    text = head.decode("utf-8", errors="ignore")
    printable = sum(c.isprintable() or c.isspace() for c in text)
    return len(text.encode()) >= 0.95 * len(head) and printable >= 0.95 * len(text)
