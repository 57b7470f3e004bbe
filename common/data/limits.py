"""The largest image medfed will decode, checked from the header before any pixel is touched.

Compression hides size: a 281 KB deflate-compressed DICOM can declare 12000 x 12000 pixels and
decode to gigabytes. Every reader computes what the file declares (rows x columns x frames x
samples) and refuses it above the cap before decoding, so a decompression bomb costs a header
read. The cap counts float32 bytes because that is what medfed holds for every image after
decoding, whatever the stored bit depth.
"""

from __future__ import annotations

import math
import os

from common.data.errors import ImageError

MAX_IMAGE_ENV = "MEDFED_MAX_IMAGE_MB"
# 512 MiB of float32 is a 512^3 CT volume or a 11585 x 11585 radiograph: above any radiology
# image a site trains on, below what one decode may take on a shared training node.
DEFAULT_MAX_IMAGE_MB = 512
DECODED_BYTES_PER_SAMPLE = 4  # float32
MIB = 2**20


def max_image_bytes() -> int:
    """Return the cap in bytes: $MEDFED_MAX_IMAGE_MB (MiB), else 512 MiB.

    Raises ValueError naming the variable when it is not a positive finite number.
    """
    text = os.environ.get(MAX_IMAGE_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_MB * MIB
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = math.nan
    if not math.isfinite(megabytes) or megabytes <= 0:
        raise ValueError(
            f"{MAX_IMAGE_ENV} must be a positive number of MiB (default {DEFAULT_MAX_IMAGE_MB}), "
            f"got {text!r}; unset it or set e.g. {MAX_IMAGE_ENV}=2048"
        )
    return int(megabytes * MIB)


def check_decoded_size(shape: tuple[int, ...], *, file_bytes: int, what: str) -> None:
    """Raise ImageError when an image of `shape` (samples, any axes) would exceed the cap.

    what: how the shape was declared, e.g. "12000x12000 pixels, 1 frame, 1 sample".
    """
    samples = math.prod(shape)
    need = samples * DECODED_BYTES_PER_SAMPLE
    try:
        cap = max_image_bytes()
    except ValueError as e:
        raise ImageError(str(e)) from None
    if need <= cap:
        return
    suggest = 2 ** math.ceil(math.log2(need / MIB))
    raise ImageError(
        f"image too large to decode: {what} = {samples:,} samples, {_mib(need)} as float32, "
        f"above the {_mib(cap)} cap (the file is {_size(file_bytes)} on disk); refused before "
        f"decoding. If the image is genuine, raise the cap with {MAX_IMAGE_ENV}={suggest}"
    )


def pixels_declared(rows: int, cols: int, frames: int, samples: int) -> str:
    """Say what a DICOM header declares, for check_decoded_size's `what`."""
    frame_word = "frame" if frames == 1 else "frames"
    sample_word = "sample" if samples == 1 else "samples"
    return f"{rows}x{cols} pixels, {frames} {frame_word} of {samples} {sample_word} per pixel"


def _mib(count: int) -> str:
    return f"{count / MIB:,.0f} MiB" if count >= MIB else f"{count / MIB:.2f} MiB"


def _size(count: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
