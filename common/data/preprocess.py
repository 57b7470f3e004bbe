"""The preprocessing settings that decide what a decoded image looks like to a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SLICE_MODES = ("all", "center")
MIN_IMAGE_SIZE = 8
# A bound well above what federated sites can train on; catches a typo such as 51200 early
# instead of failing with an out-of-memory error in the middle of a round.
MAX_IMAGE_SIZE = 2048


@dataclass(frozen=True)
class Preprocess:
    """How every image of every site is turned into model input.

    image_size: output is image_size x image_size (aspect kept by zero-padding to square).
    channels: 1 (grey, luminance for colour images) or 3 (RGB, grey repeated).
    slices: "all" makes every slice/frame of a volume a sample; "center" keeps the central one.
    """

    image_size: int = 64
    channels: int = 1
    slices: str = "all"

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"image_size must be an integer, got {size!r}")
        if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be >= {MIN_IMAGE_SIZE} and <= {MAX_IMAGE_SIZE}, got {size}"
            )
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")
        if self.slices not in SLICE_MODES:
            raise ValueError(f"slices must be 'all' or 'center', got {self.slices!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-able dict (used in cache keys and data cards)."""
        return asdict(self)
