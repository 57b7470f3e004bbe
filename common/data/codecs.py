"""The frame size a JPEG, JPEG-LS or JPEG 2000 codestream declares, read before decoding it.

The codec libraries allocate what the codestream's own header declares, not what the DICOM
header says; a damaged or crafted frame that declares 65535 x 65535 pixels inside a 64 x 64
image would make libjpeg or OpenJPEG allocate gigabytes before pydicom could compare sizes.
"""

from __future__ import annotations

# JPEG start-of-frame markers (all processes) and JPEG-LS SOF55; C4/C8/CC are DHT/JPG/DAC.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length
_SOS, _SOI = 0xDA, 0xD8
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC followed by SIZ
_J2K_SEARCH = 4096  # a JP2 wrapper puts a few boxes before the codestream


def declared_frame_size(frame: bytes) -> tuple[int, int, int] | None:
    """Return (rows, columns, components) from a codestream's header, or None if not found."""
    if frame[:2] == b"\xff\xd8":
        return _jpeg(frame)
    at = frame.find(_J2K_SIZ, 0, _J2K_SEARCH)
    if at >= 0:
        return _j2k(frame, at + 4)
    return None


def _jpeg(data: bytes) -> tuple[int, int, int] | None:
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _STANDALONE or marker == _SOI:
            at += 2
            continue
        if marker == _SOS:
            return None
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF:
            if at + 10 > len(data):
                return None
            rows = int.from_bytes(data[at + 5 : at + 7], "big")
            cols = int.from_bytes(data[at + 7 : at + 9], "big")
            return rows, cols, data[at + 9]
        at += 2 + length
    return None


def _j2k(data: bytes, at: int) -> tuple[int, int, int] | None:
    # SIZ: Lsiz(2) Rsiz(2) Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz (4 each) Csiz(2)
    if at + 38 > len(data):
        return None
    x, y, x0, y0 = (int.from_bytes(data[at + 4 + 4 * i : at + 8 + 4 * i], "big") for i in range(4))
    components = int.from_bytes(data[at + 36 : at + 38], "big")
    return max(y - y0, 0), max(x - x0, 0), components
