"""Per-site scanner shift: each virtual site sees the pool through its own "scanner".

Sites cut out of one pool share one acquisition; real hospitals do not. A `ScannerShift` gives
every site a fixed intensity gain, contrast (gamma) and noise level, drawn from the run's seed and
the site's name, so a site looks the same in every round and every worker process.

    x' = clip(gain * x ** gamma + noise, 0, 1)
    gain  ~ U[1 - intensity, 1 + intensity]
    gamma = exp(U[-contrast, contrast])
    noise ~ N(0, sigma^2) per pixel, sigma ~ U[0, noise]
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SiteScanner:
    """One site's draw: what its scanner does to every image."""

    gain: float
    gamma: float
    sigma: float


@dataclass(frozen=True)
class ScannerShift:
    """How far sites' scanners may differ (0 everywhere: no shift)."""

    intensity: float = 0.0
    contrast: float = 0.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.intensity < 1:
            raise ValueError(
                f"data.scanner_shift.intensity must be in [0, 1), e.g. 0.2, got {self.intensity}"
            )
        if not 0 <= self.contrast <= 2:
            raise ValueError(
                f"data.scanner_shift.contrast must be in [0, 2], e.g. 0.3, got {self.contrast}"
            )
        if not 0 <= self.noise <= 1:
            raise ValueError(
                f"data.scanner_shift.noise must be in [0, 1] (images are in [0, 1]), e.g. 0.03, "
                f"got {self.noise}"
            )

    @property
    def active(self) -> bool:
        """Whether this shift changes anything."""
        return bool(self.intensity or self.contrast or self.noise)

    def scanner(self, site: str, seed: int) -> SiteScanner:
        """Site `site`'s scanner, the same for the same (seed, site) everywhere."""
        rng = np.random.default_rng([seed, 0x5CA7, zlib.crc32(site.encode())])
        return SiteScanner(
            gain=float(rng.uniform(1 - self.intensity, 1 + self.intensity)),
            gamma=float(np.exp(rng.uniform(-self.contrast, self.contrast))),
            sigma=float(rng.uniform(0, self.noise)),
        )

    def apply(self, images: np.ndarray, *, site: str, seed: int, split: str) -> np.ndarray:
        """`images` (float32 in [0, 1]) as site `site`'s scanner would have acquired them."""
        if not self.active or not len(images):
            return images
        s = self.scanner(site, seed)
        out = s.gain * np.power(np.clip(images, 0, 1), s.gamma, dtype=np.float32)
        if s.sigma > 0:
            # noise fixed per (seed, site, split): an image looks the same in every round
            rng = np.random.default_rng([seed, 0x0015E, zlib.crc32(f"{site}/{split}".encode())])
            out += rng.normal(0, s.sigma, size=out.shape).astype(np.float32)
        return np.clip(out, 0, 1).astype(np.float32, copy=False)
