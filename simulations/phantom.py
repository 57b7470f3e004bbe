"""Chest phantoms, and the scanners that image them, as plain numpy arrays.

A patient is sampled once in millimetres and can then be imaged on any site's pixel grid, so the
same anatomy model serves CT, MR and radiography sites. Coordinates: origin at the centre of the
field of view, ``x`` grows along the columns (to the image's right), ``y`` grows along the rows
(down the image). Images and masks are ``(rows, cols)`` arrays, rows along axis 0 exactly as
pydicom's ``pixel_array`` returns them.

Two views exist: ``"axial"`` (a transverse chest slice, as CT and MR sites store it) and
``"frontal"`` (a PA chest radiograph, as DX and CR sites store it). A lesion is a lung nodule: a
round-to-lobulated blob whose size and contrast vary from obvious to subtle, among lung vessels of
similar calibre that a classifier must learn not to flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

View = Literal["axial", "frontal"]

# Lesion difficulty, calibrated against models.cnn.CNNClassifier (see simulations/synth/):
# most lesions are conspicuous nodules or masses, the rest subtle (small and faint); the
# subtle fraction sets how far below 1.0 the achievable AUC lies.
CONSPICUOUS_DIAMETER_MM = (30.0, 60.0)
CONSPICUOUS_CONTRAST = (1.0, 1.6)  # multiples of the lung -> TissueValues.lesion step
SUBTLE_DIAMETER_MM = (8.0, 20.0)
SUBTLE_CONTRAST = (0.15, 0.5)
SUBTLE_FRACTION = 0.2
# Lung vessels per lung and their radius range (mm, hilum to periphery): the look-alikes that
# keep small lesions from being trivial.
VESSELS_PER_LUNG = (8, 20)
VESSEL_RADIUS_MM = (0.6, 2.4)
# Harmonic amplitudes of a lobulated outline; their sum bounds how far it strays from a circle.
LESION_LOBULATION = (0.12, 0.08, 0.05)


@dataclass(frozen=True)
class Grid:
    """A pixel grid: ``rows`` x ``cols`` pixels of ``spacing`` = (row, col) millimetres."""

    rows: int
    cols: int
    spacing: tuple[float, float]

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the y (per row) and x (per column) pixel-centre coordinates in mm."""
        dy, dx = self.spacing
        ys = (np.arange(self.rows) - (self.rows - 1) / 2) * dy
        xs = (np.arange(self.cols) - (self.cols - 1) / 2) * dx
        return ys, xs


@dataclass(frozen=True)
class TissueValues:
    """What a scanner measures in each tissue, in its physical unit (HU for CT).

    ``lesion`` is a full-contrast lesion; a lesion of contrast ``c`` measures
    ``lung + c * (lesion - lung)``.
    """

    air: float
    fat: float
    soft: float
    lung: float
    heart: float
    bone: float
    vessel: float
    lesion: float


@dataclass(frozen=True)
class Ellipse:
    """An ellipse with centre (cx, cy), semi-axes (ax, ay) in mm, rotated by ``angle`` radians."""

    cx: float
    cy: float
    ax: float
    ay: float
    angle: float = 0.0

    def extent(self) -> float:
        """Return a radius that encloses the ellipse."""
        return max(self.ax, self.ay)

    def coverage(self, x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
        """Fraction of each pixel inside the ellipse, ramping over ``edge`` mm at the border."""
        return np.clip(0.5 - self.distance(x, y) / edge, 0.0, 1.0)

    def distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance to the border in mm (first order): < 0 inside, > 0 outside."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        u = c * (x - self.cx) + s * (y - self.cy)
        v = -s * (x - self.cx) + c * (y - self.cy)
        rho = np.sqrt((u / self.ax) ** 2 + (v / self.ay) ** 2)
        # First-order signed distance to the border: (rho - 1) / |grad rho|.
        grad = np.sqrt((u / self.ax**2) ** 2 + (v / self.ay**2) ** 2) / np.maximum(rho, 1e-6)
        return (rho - 1.0) / np.maximum(grad, 1e-6)

    def sample_inside(self, rng: np.random.Generator, margin: float) -> tuple[float, float]:
        """Return a uniform random point at least ~``margin`` mm inside the border."""
        r = np.sqrt(rng.uniform()) if margin < min(self.ax, self.ay) else 0.0
        t = rng.uniform(0, 2 * np.pi)
        u = r * max(self.ax - margin, 0.0) * np.cos(t)
        v = r * max(self.ay - margin, 0.0) * np.sin(t)
        c, s = np.cos(self.angle), np.sin(self.angle)
        return self.cx + c * u - s * v, self.cy + s * u + c * v


@dataclass(frozen=True)
class Lesion:
    """A lung nodule: centre, mean radius (mm), outline harmonics and contrast in [0, 1]."""

    cx: float
    cy: float
    radius: float
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) of cos(k * theta), k = 2, 3..
    contrast: float

    def outline(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance-like field: < 0 inside the lobulated outline, in mm."""
        dx, dy = x - self.cx, y - self.cy
        theta = np.arctan2(dy, dx)
        r = np.full(np.broadcast_shapes(dx.shape, dy.shape), self.radius)
        for k, (amp, phase) in enumerate(self.harmonics, start=2):
            r = r + self.radius * amp * np.cos(k * theta + phase)
        return np.hypot(dx, dy) - r


@dataclass(frozen=True)
class Phantom:
    """One patient's chest in one view, with or without a lesion."""

    view: View
    body: Ellipse
    fat_mm: float
    lungs: tuple[Ellipse, Ellipse]
    heart: Ellipse
    spine: Ellipse
    extras: tuple[Ellipse, ...]  # aorta and sternum (axial) or nothing (frontal)
    vessels: tuple[Ellipse, ...]
    ribs: tuple[tuple[float, float, float, float], ...]  # (y0, curvature, side, half-width)
    lesion: Lesion | None


@dataclass(frozen=True)
class Scanner:
    """How one site's machine turns a phantom into pixel values (before DICOM encoding).

    Args:
        blur_mm: Gaussian point-spread sigma in mm.
        noise: standard deviation of the acquisition noise, in tissue units.
        texture: amplitude of smooth parenchymal texture, in tissue units.
        bias: amplitude of smooth multiplicative shading (MR coil profile, X-ray heel effect).
        rician: magnitude (MR) noise instead of additive Gaussian noise.

    """

    view: View
    grid: Grid
    tissues: TissueValues
    blur_mm: float
    noise: float
    texture: float
    bias: float
    rician: bool = False


def sample_phantom(
    rng: np.random.Generator, view: View, *, lesion: bool, min_radius: float = 0.0
) -> Phantom:
    """Draw one patient's anatomy (and a lesion if ``lesion``) with per-patient variation.

    Args:
        min_radius: smallest lesion radius in mm; pass ``min_lesion_radius(grid)`` so that the
            lesion mask is never empty on the grid it will be imaged on.

    """
    sample = _sample_axial if view == "axial" else _sample_frontal
    return sample(rng, lesion, min_radius)


def _jitter(rng: np.random.Generator, value: float, rel: float) -> float:
    return float(value * (1.0 + rng.uniform(-rel, rel)))


def _sample_axial(rng: np.random.Generator, with_lesion: bool, min_radius: float) -> Phantom:
    u = rng.uniform
    half_w, half_h = _jitter(rng, 165, 0.12), _jitter(rng, 115, 0.12)
    cx, cy = u(-15, 15), u(-12, 12)
    body = Ellipse(cx, cy, half_w, half_h, u(-0.05, 0.05))
    left, right = (
        Ellipse(
            cx + side * _jitter(rng, 0.45 * half_w, 0.1),
            cy + u(-0.12, 0.02) * half_h,
            _jitter(rng, 0.33 * half_w, 0.12),
            _jitter(rng, 0.62 * half_h, 0.12),
            side * u(0.05, 0.3),
        )
        for side in (-1, 1)
    )
    lungs = (left, right)
    heart = Ellipse(
        cx + _jitter(rng, 0.12 * half_w, 0.5),
        cy - _jitter(rng, 0.2 * half_h, 0.4),
        _jitter(rng, 0.22 * half_w, 0.15),
        _jitter(rng, 0.35 * half_h, 0.15),
        u(-0.6, -0.2),
    )
    spine = Ellipse(
        cx + u(-4, 4), cy + 0.72 * half_h, _jitter(rng, 17, 0.15), _jitter(rng, 16, 0.15)
    )
    aorta_r = _jitter(rng, 12, 0.2)
    aorta = Ellipse(spine.cx + u(10, 22), spine.cy - u(22, 32), aorta_r, aorta_r)
    sternum = Ellipse(cx + u(-4, 4), cy - 0.9 * half_h, _jitter(rng, 14, 0.2), _jitter(rng, 6, 0.2))
    vessels = tuple(v for lung in lungs for v in _axial_vessels(rng, lung, cx))
    lesion = _sample_lesion(rng, lungs, min_radius) if with_lesion else None
    return Phantom(
        "axial", body, _jitter(rng, 14, 0.5), lungs, heart, spine, (aorta, sternum), vessels,
        (), lesion,
    )


def _axial_vessels(rng: np.random.Generator, lung: Ellipse, midline: float) -> list[Ellipse]:
    # Vessels are denser and wider near the hilum (medial), thinner towards the pleura, and
    # cut obliquely by the slice, so some look round (nodule-like) and some elongated.
    out = []
    lo, hi = VESSEL_RADIUS_MM
    for _ in range(int(rng.integers(*VESSELS_PER_LUNG))):
        x, y = lung.sample_inside(rng, 3.0)
        medial = 1.0 - min(abs(x - midline) / (abs(lung.cx - midline) + lung.ax), 1.0)
        r = lo + (hi - lo) * medial * rng.uniform(0.3, 1.0)
        out.append(Ellipse(x, y, r * rng.uniform(1.0, 3.5), r, rng.uniform(0, np.pi)))
    return out


def _sample_frontal(rng: np.random.Generator, with_lesion: bool, min_radius: float) -> Phantom:
    u = rng.uniform
    cx = u(-12, 12)
    # Narrower than the detector, so direct-exposure air frames the chest as on real films.
    body = Ellipse(cx, u(30, 70), _jitter(rng, 138, 0.1), _jitter(rng, 290, 0.1))
    top = u(-150, -120)
    left, right = (
        Ellipse(
            cx + side * _jitter(rng, 62, 0.1),
            top + (a := _jitter(rng, 120, 0.12)),
            _jitter(rng, 48, 0.12),
            a,
            side * u(-0.12, 0.02),
        )
        for side in (-1, 1)
    )
    lungs = (left, right)
    heart = Ellipse(
        cx + _jitter(rng, 22, 0.4),
        top + _jitter(rng, 170, 0.1),
        _jitter(rng, 62, 0.15),
        _jitter(rng, 50, 0.15),
        u(-0.5, -0.1),
    )
    spine, vessels, ribs = frontal_frame(rng, lungs, cx, top)
    lesion = _sample_lesion(rng, lungs, min_radius) if with_lesion else None
    return Phantom("frontal", body, 0.0, lungs, heart, spine, (), vessels, ribs, lesion)


def frontal_frame(
    rng: np.random.Generator, lungs: tuple[Ellipse, ...], cx: float, top: float
) -> tuple[Ellipse, tuple[Ellipse, ...], tuple[tuple[float, float, float, float], ...]]:
    """A frontal film's spine, lung vessels and rib arcs.

    Shared by the lesion and anatomy phantoms, and drawn in this order, so that either keeps
    its images for a seed.
    """
    u = rng.uniform
    spine = Ellipse(cx + u(-3, 3), 0.0, _jitter(rng, 24, 0.15), 400.0)
    vessels = tuple(v for lung in lungs for v in frontal_vessels(rng, lung, cx))
    spacing = _jitter(rng, 24, 0.1)
    ribs = tuple(
        (top + 8 + i * spacing + u(-3, 3), _jitter(rng, 0.006, 0.3), side, _jitter(rng, 5, 0.2))
        for side in (-1.0, 1.0)
        for i in range(9)
    )
    return spine, vessels, ribs


def frontal_vessels(rng: np.random.Generator, lung: Ellipse, midline: float) -> list[Ellipse]:
    """Vessel shadows of a frontal view in ``lung``, the spine at ``midline``."""
    # Lung markings radiate from the hilum and thin out towards the periphery.
    hx = lung.cx - np.sign(lung.cx - midline) * 0.55 * lung.ax
    hy = lung.cy + rng.uniform(-0.1, 0.15) * lung.ay
    out = []
    lo, hi = VESSEL_RADIUS_MM
    for _ in range(int(rng.integers(*VESSELS_PER_LUNG)) * 2):
        x, y = lung.sample_inside(rng, 4.0)
        dist = float(np.hypot(x - hx, y - hy))
        width = max(lo, hi * (1.0 - dist / (1.6 * lung.ay))) * rng.uniform(0.7, 1.3)
        out.append(Ellipse(x, y, rng.uniform(5, 14), width, float(np.arctan2(y - hy, x - hx))))
    return out


def _sample_lesion(
    rng: np.random.Generator, lungs: tuple[Ellipse, Ellipse], min_radius: float
) -> Lesion:
    lung = lungs[int(rng.integers(2))]
    subtle = rng.uniform() < SUBTLE_FRACTION
    lo, hi = SUBTLE_DIAMETER_MM if subtle else CONSPICUOUS_DIAMETER_MM
    # Log-uniform sizes: small nodules are as common as large ones per octave, as in screening.
    radius = max(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) / 2, min_radius)
    harmonics = tuple((rng.uniform(0, a), rng.uniform(0, 2 * np.pi)) for a in LESION_LOBULATION)
    cx, cy = lung.sample_inside(rng, 1.3 * radius)
    contrast = float(rng.uniform(*(SUBTLE_CONTRAST if subtle else CONSPICUOUS_CONTRAST)))
    return Lesion(cx, cy, radius, harmonics, contrast)


def min_lesion_radius(grid: Grid) -> float:
    """Smallest mean radius whose outline always contains a pixel centre of ``grid``."""
    # A disc of radius >= half the pixel diagonal covers a pixel centre wherever it sits.
    return float(np.hypot(*grid.spacing) / 2 / (1.0 - sum(LESION_LOBULATION)))


def acquire(
    phantom: Phantom, scanner: Scanner, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``phantom`` with ``scanner``: return (float32 image, bool lesion mask) on its grid."""
    grid = scanner.grid
    image, body = _render(phantom, grid, scanner.tissues)
    mask = np.zeros((grid.rows, grid.cols), dtype=bool)
    if phantom.lesion is not None:
        ys, xs = grid.axes()
        mask = phantom.lesion.outline(xs[None, :], ys[:, None]) <= 0.0
    return scan(image, body, scanner, rng), mask


def scan(
    image: np.ndarray, body: np.ndarray, scanner: Scanner, rng: np.random.Generator
) -> np.ndarray:
    """Return what ``scanner`` records of a noise-free ``image``, as float32.

    Texture inside ``body`` (its coverage), shading, blur and noise, in that order.
    """
    grid = scanner.grid
    ps = np.asarray(grid.spacing)
    if scanner.texture > 0:
        field = ndimage.gaussian_filter(rng.standard_normal(image.shape), 2.5 / ps)
        image += scanner.texture * body * field / max(float(field.std()), 1e-6)
    if scanner.bias > 0:
        image *= shading(grid, scanner.bias, rng)
    image = ndimage.gaussian_filter(image, scanner.blur_mm / ps)
    return with_noise(image, scanner, rng)


def with_noise(image: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """The scanner's acquisition noise on `image`: Gaussian, or Rician (MR magnitude), float32."""
    noise = rng.standard_normal(image.shape) * scanner.noise
    if scanner.rician:
        image = np.hypot(image + noise, rng.standard_normal(image.shape) * scanner.noise)
    else:
        image = image + noise
    return image.astype(np.float32)


def shading(grid: Grid, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative ramp of ``amplitude`` across the field of view, random direction."""
    ys, xs = grid.axes()
    t = rng.uniform(0, 2 * np.pi)
    span = max(grid.rows * grid.spacing[0], grid.cols * grid.spacing[1]) / 2
    ramp = (np.cos(t) * xs[None, :] + np.sin(t) * ys[:, None]) / span
    return 1.0 + amplitude * ramp


def _render(
    phantom: Phantom, grid: Grid, tissues: TissueValues
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free image and body coverage of ``phantom`` on ``grid``."""
    ys, xs = grid.axes()
    edge = max(grid.spacing)
    image = np.full((grid.rows, grid.cols), tissues.air, dtype=np.float64)

    def window(shape: Ellipse) -> tuple[slice, slice, np.ndarray, np.ndarray]:
        # Evaluate small shapes only around themselves: a full-grid pass per vessel is the
        # difference between seconds and minutes for a thousand images.
        reach = shape.extent() + 2 * edge
        r0, r1 = np.searchsorted(ys, [shape.cy - reach, shape.cy + reach])
        c0, c1 = np.searchsorted(xs, [shape.cx - reach, shape.cx + reach])
        return slice(r0, r1), slice(c0, c1), xs[None, c0:c1], ys[r0:r1, None]

    def paint(
        shape: Ellipse, value: float, within: np.ndarray | None = None, add: bool = False
    ) -> None:
        rs, cs, x, y = window(shape)
        cover = shape.coverage(x, y, edge)
        if within is not None:
            cover = cover * within[rs, cs]
        image[rs, cs] += cover * (value if add else value - image[rs, cs])

    body = phantom.body.coverage(xs[None, :], ys[:, None], edge)
    if phantom.view == "axial":
        b = phantom.body
        paint(b, tissues.fat)
        f = phantom.fat_mm
        paint(Ellipse(b.cx, b.cy, b.ax - f, b.ay - f, b.angle), tissues.soft)
        aorta, sternum = phantom.extras
        paint(phantom.heart, tissues.heart)
        paint(aorta, tissues.heart)
        paint(phantom.spine, tissues.bone)
        paint(sternum, tissues.bone)
        # The lungs go on top: pleura, not a bulging heart, borders every lung field, so a
        # round bright blob inside a lung field is a lesion or a vessel and nothing else.
        for lung in phantom.lungs:
            paint(lung, tissues.lung)
        lung_cover = _union(phantom.lungs, xs, ys, edge)
        for vessel in phantom.vessels:
            paint(vessel, tissues.vessel, within=lung_cover)
        if phantom.lesion is not None:
            _paint_lesion(image, phantom.lesion, xs, ys, edge, tissues, additive=False)
    else:
        paint(phantom.body, tissues.soft)
        for lung in phantom.lungs:
            paint(lung, tissues.lung)
        lung_cover = _union(phantom.lungs, xs, ys, edge)
        # In projection the heart overlaps the lower lung fields: retrocardiac lung stays
        # partly visible, so the heart shadow is fainter where it crosses a lung.
        paint(phantom.heart, tissues.heart, within=1.0 - 0.6 * lung_cover)
        paint(phantom.spine, tissues.bone, within=body)
        # Projected vessels add their attenuation to whatever lies in front of or behind them.
        for vessel in phantom.vessels:
            paint(vessel, tissues.vessel - tissues.lung, within=lung_cover, add=True)
        image += 0.25 * (tissues.bone - tissues.soft) * _ribs(phantom, xs, ys, edge) * body
        if phantom.lesion is not None:
            _paint_lesion(image, phantom.lesion, xs, ys, edge, tissues, additive=True)
    return image, body


def _union(shapes: tuple[Ellipse, ...], xs: np.ndarray, ys: np.ndarray, edge: float) -> np.ndarray:
    return np.maximum.reduce([s.coverage(xs[None, :], ys[:, None], edge) for s in shapes])


def _ribs(phantom: Phantom, xs: np.ndarray, ys: np.ndarray, edge: float) -> np.ndarray:
    """Coverage of the rib shadows of a frontal view: arcs curving down away from the spine."""
    return rib_shadows(phantom.ribs, phantom.spine.cx, phantom.lungs, xs, ys, edge)


def rib_shadows(
    ribs: tuple[tuple[float, float, float, float], ...],
    mid: float,
    lungs: tuple[Ellipse, ...],
    xs: np.ndarray,
    ys: np.ndarray,
    edge: float,
) -> np.ndarray:
    """Coverage of rib shadows (y0, curvature, side, half-width) beside the spine at ``mid``."""
    out = np.zeros((ys.size, xs.size))
    reach = max(abs(lung.cx - mid) + lung.ax for lung in lungs) + 10
    for y0, curvature, side, half in ribs:
        lateral = (xs - mid) * side
        arc = y0 + curvature * np.clip(lateral, 0, None) ** 2
        cover = np.clip(0.5 - (np.abs(ys[:, None] - arc[None, :]) - half) / edge, 0.0, 1.0)
        out = np.maximum(out, cover * ((lateral > 15) & (lateral < reach))[None, :])
    return out


def _paint_lesion(
    image: np.ndarray,
    lesion: Lesion,
    xs: np.ndarray,
    ys: np.ndarray,
    edge: float,
    tissues: TissueValues,
    *,
    additive: bool,
) -> None:
    reach = lesion.radius * (1 + sum(LESION_LOBULATION)) + 2 * edge
    r0, r1 = np.searchsorted(ys, [lesion.cy - reach, lesion.cy + reach])
    c0, c1 = np.searchsorted(xs, [lesion.cx - reach, lesion.cx + reach])
    cover = np.clip(0.5 - lesion.outline(xs[None, c0:c1], ys[r0:r1, None]) / edge, 0.0, 1.0)
    step = lesion.contrast * (tissues.lesion - tissues.lung)
    patch = image[r0:r1, c0:c1]
    # A radiograph sums attenuation along the ray, so a nodule adds to whatever overlaps it;
    # a slice replaces the lung it occupies.
    patch += cover * (step if additive else (tissues.lung + step - patch))
