"""What a reader hands to the normaliser: decoded pixels in modality units plus their metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.data.errors import Problem


@dataclass(frozen=True)
class ImageMeta:
    """Facts about an image as it was stored, before any resizing.

    rows, cols, slices: original geometry (slices = frames, series files or NIfTI z-planes).
    pixel_spacing: (row spacing, column spacing) in mm, or None when the header has none.
    transfer_syntax: DICOM transfer syntax name, or "NIfTI".
    modality, photometric: DICOM Modality / Photometric Interpretation; None for NIfTI.
    skipped: files inside a series folder that were not DICOM and were left out.
    """

    modality: str | None
    rows: int
    cols: int
    slices: int
    pixel_spacing: tuple[float, float] | None
    transfer_syntax: str
    photometric: str | None
    skipped: tuple[Problem, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (round-trips through `from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageMeta:
        """Rebuild from `to_dict` output (JSON turns tuples into lists)."""
        spacing = data["pixel_spacing"]
        return cls(
            modality=data["modality"],
            rows=int(data["rows"]),
            cols=int(data["cols"]),
            slices=int(data["slices"]),
            pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,
            transfer_syntax=data["transfer_syntax"],
            photometric=data["photometric"],
            skipped=tuple(Problem(**p) for p in data.get("skipped", ())),
        )


@dataclass
class RawVolume:
    """Decoded pixels before normalisation.

    pixels: float32 (S, H, W, C) with C = 1 (grey) or 3 (RGB), in modality units
    (Hounsfield units for CT after rescale; stored values otherwise).
    window: (center, width) from the header, used only for CT.
    invert: MONOCHROME1, where low values are bright; flipped after normalisation.
    """

    pixels: np.ndarray
    meta: ImageMeta
    window: tuple[float, float] | None = None
    invert: bool = False
