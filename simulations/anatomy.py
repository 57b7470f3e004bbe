"""Anatomical label maps for the phantoms: one label table, organ intensities, a labelled canvas.

``medfed synth --masks anatomy`` writes, for every image, a label map in which each pixel holds
the structure that was painted last over its centre, from one table shared by every view::

    0 background   air outside the patient (direct exposure on a radiograph)
    1 body         everything inside the skin not listed below (fat, muscle, bone,
                   mediastinum, great vessels, stomach, spleen, abdomen)
    2 right lung   the patient's right (image left on axial slices and PA radiographs)
    3 left lung
    4 heart        with the pericardium; on a radiograph the cardiac shadow, which covers
                   the lung behind it
    5 liver        below the right hemidiaphragm (low axial slices, the lower radiograph)
    6 lesion       the lung nodule; it wins over the lung it lies in

Lung vessels lie inside the lung label, as lung masks of real CT include them. The label map is
exactly what was painted: a structure's label covers the pixels whose centre lies inside it
(coverage >= 0.5 of the anti-aliased edge), in painting order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from simulations.phantom import (
    CONSPICUOUS_CONTRAST,
    CONSPICUOUS_DIAMETER_MM,
    LESION_LOBULATION,
    SUBTLE_CONTRAST,
    SUBTLE_DIAMETER_MM,
    SUBTLE_FRACTION,
    Grid,
    Lesion,
    TissueValues,
)

LABELS: dict[int, str] = {
    0: "background",
    1: "body",
    2: "right lung",
    3: "left lung",
    4: "heart",
    5: "liver",
    6: "lesion",
}
BACKGROUND, BODY, RIGHT_LUNG, LEFT_LUNG, HEART, LIVER, LESION = range(7)
NUM_CLASSES = len(LABELS)
LESION_ONLY: dict[int, str] = {0: "background", 1: "lesion"}
_PLACEMENT_TRIES = 40
_SMALLEST_MM = 0.5  # a nodule never shrinks below this, whatever min_radius says


@dataclass(frozen=True)
class AnatomyTissues:
    """A site's tissue values for the anatomical phantoms, in its physical unit.

    ``base`` holds the values the lesion phantoms use (heart and vessel after contrast, if the
    site injects it); the rest are organs only the anatomical phantoms draw. ``blood`` fills the
    aorta; ``abdomen`` the abdominal cavity around the organs (fat and bowel).
    """

    base: TissueValues
    liver: float
    spleen: float
    abdomen: float
    blood: float
    enhanced: bool = False


def organ_tissues(
    modality: str, base: TissueValues, rng: np.random.Generator
) -> AnatomyTissues:
    """Draw a site's organ values around ``base`` (its jittered lesion-phantom tissues).

    CT sites scan with or without intravenous contrast (then blood, heart, vessels, liver and
    spleen enhance); MR sites keep their T1-like (bright blood, gradient echo) or T2-like (dark
    blood) weighting; radiographs see the liver as a denser region below the right
    hemidiaphragm. Each organ differs from every tissue around it, so its outline shows.
    """
    u = rng.uniform
    if modality == "CT":
        offset = base.soft - 45.0  # the site's calibration offset, as the base values carry it
        enhanced = bool(u() < 0.5)
        if enhanced:
            blood = u(150, 280) + offset
            base = dataclasses.replace(base, heart=blood * u(0.8, 0.95), vessel=blood)
            liver, spleen = u(95, 130) + offset, u(110, 140) + offset
        else:
            blood = base.heart
            liver, spleen = u(55, 70) + offset, u(40, 50) + offset
        return AnatomyTissues(base, liver, spleen, u(-80, -50) + offset, blood, enhanced)
    if modality == "MR":
        # The abdomen around the organs: bowel and mesentery, darker than the liver.
        if base.heart > 0.6 * base.soft:  # T1-like: liver brighter than spleen and muscle
            liver, spleen, abdomen = 1.35 * base.soft, 0.95 * base.soft, 0.7 * base.soft
            # gradient echo: inflowing blood is bright, above the pericardial fat around it
            base = dataclasses.replace(base, heart=base.fat * u(1.15, 1.3))
        else:  # T2-like: dark (flowing) blood, liver above muscle and bowel, spleen above it
            liver, spleen, abdomen = 1.3 * base.soft, 1.6 * base.soft, 0.8 * base.soft
        jitter = u(0.93, 1.07, size=3)
        return AnatomyTissues(
            base, liver * jitter[0], spleen * jitter[1], abdomen * jitter[2], base.heart
        )
    liver = base.soft + u(0.4, 0.55) * (base.heart - base.soft)
    abdomen = base.soft - u(0.05, 0.15) * (base.soft - base.lung)
    return AnatomyTissues(base, liver, liver, abdomen, base.heart)


class Canvas:
    """A noise-free image and its label map, painted shape by shape on one grid.

    Shapes come as signed distance fields in mm (< 0 inside), evaluated on the whole grid or on
    a window of it. Painting blends ``value`` over the anti-aliased coverage of the shape; a
    ``label`` is written where the pixel centre lies inside (distance <= 0).
    """

    def __init__(self, grid: Grid, background: float) -> None:
        ys, xs = grid.axes()
        self.x, self.y = xs[None, :], ys[:, None]
        self.edge = float(max(grid.spacing))
        self.image = np.full((grid.rows, grid.cols), background, dtype=np.float64)
        self.labels = np.zeros((grid.rows, grid.cols), dtype=np.uint8)

    def cover(self, dist: np.ndarray) -> np.ndarray:
        """Fraction of each pixel inside a shape of signed distance ``dist``."""
        return np.clip(0.5 - dist / self.edge, 0.0, 1.0)

    def window(self, cx: float, cy: float, reach: float) -> tuple[slice, slice]:
        """The rows and columns within ``reach`` mm of (cx, cy)."""
        reach += 2 * self.edge
        ys, xs = self.y[:, 0], self.x[0]
        r0, r1 = np.searchsorted(ys, [cy - reach, cy + reach])
        c0, c1 = np.searchsorted(xs, [cx - reach, cx + reach])
        return slice(int(r0), int(r1)), slice(int(c0), int(c1))

    def paint(
        self,
        dist: np.ndarray,
        value: float,
        *,
        label: int | None = None,
        weight: np.ndarray | float = 1.0,
        add: bool = False,
        at: tuple[slice, slice] | None = None,
    ) -> None:
        """Paint a shape: blend (or, ``add``, add) ``value`` over its coverage times ``weight``.

        ``at``: the window ``dist`` (and an array ``weight``) was evaluated on.
        """
        rs, cs = at if at is not None else (slice(None), slice(None))
        image = self.image[rs, cs]
        cover = self.cover(dist) * weight
        image += cover * (value if add else value - image)
        if label is not None:
            self.labels[rs, cs][dist <= 0.0] = label


def union(*dists: np.ndarray) -> np.ndarray:
    """Signed distance of the union of shapes (first order, as the shapes')."""
    return np.minimum.reduce(np.broadcast_arrays(*dists))


def intersect(*dists: np.ndarray) -> np.ndarray:
    """Signed distance of the intersection of shapes."""
    return np.maximum.reduce(np.broadcast_arrays(*dists))


def minus(dist: np.ndarray, *holes: np.ndarray) -> np.ndarray:
    """Signed distance of a shape with ``holes`` cut out."""
    return intersect(dist, *(-h for h in holes))


def area_fractions(labels: np.ndarray) -> dict[str, float]:
    """Share of the image each label covers, by name (labels absent from the map are 0)."""
    counts = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    return {name: float(counts[k]) / labels.size for k, name in LABELS.items()}


def place_lesion(
    rng: np.random.Generator,
    candidate: Callable[[float], tuple[float, float]],
    lung_distance: Callable[[float, float], float],
    min_radius: float,
) -> Lesion | None:
    """Draw a nodule as the lesion phantoms do and place it wholly inside a lung field.

    Args:
        candidate: a random point at least ``margin`` mm inside a lung's outline, given margin.
        lung_distance: signed distance (mm) of a point to the lung fields (< 0 inside), with
            every cut (heart, diaphragm, mediastinum) applied.
        min_radius: smallest radius; a nodule that fits nowhere shrinks down to it first.

    Returns:
        The lesion, or None when even the smallest nodule fits nowhere (a lung's thin base).

    """
    subtle = rng.uniform() < SUBTLE_FRACTION
    lo, hi = SUBTLE_DIAMETER_MM if subtle else CONSPICUOUS_DIAMETER_MM
    radius = max(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) / 2, min_radius)
    harmonics = tuple((rng.uniform(0, a), rng.uniform(0, 2 * np.pi)) for a in LESION_LOBULATION)
    contrast = float(rng.uniform(*(SUBTLE_CONTRAST if subtle else CONSPICUOUS_CONTRAST)))
    reach = 1.0 + sum(LESION_LOBULATION)
    while True:
        for _ in range(_PLACEMENT_TRIES):
            x, y = candidate(reach * radius)
            if lung_distance(x, y) <= -reach * radius:
                return Lesion(x, y, radius, harmonics, contrast)
        if radius <= max(min_radius, _SMALLEST_MM):
            return None
        # Lung bases and apices are thin: a big mass does not fit there, a smaller one does.
        radius = max(min_radius, 0.8 * radius)
