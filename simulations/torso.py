"""A patient's chest and upper abdomen in 3D, cut into labelled axial slices.

Coordinates in mm: ``x`` to the patient's left (image columns), ``y`` to the back (image rows),
``z`` up, with ``z = 0`` at the top of the right hemidiaphragm. Organs are ellipses or
ellipsoids, cut where anatomy cuts them: each hemidiaphragm is a paraboloid dome, so below its
top a slice shows the lung as a crescent around the liver (right) or stomach and spleen (left),
and the lungs stop short of the heart's pericardial fat, the spine and the mediastinum. Lung
vessels are tapering tubes from the hilum, so consecutive slices of a volume show the same
vessel moving, and a nodule is a lobulated ball. Labels follow ``simulations.anatomy``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

from simulations.anatomy import (
    BODY,
    HEART,
    LEFT_LUNG,
    LESION,
    LIVER,
    RIGHT_LUNG,
    AnatomyTissues,
    Canvas,
    intersect,
    minus,
    place_lesion,
    union,
)
from simulations.phantom import VESSEL_RADIUS_MM, Ellipse, Grid, Lesion

_FAR = 1e4  # the distance of a shape absent from a slice: outside everywhere
# Vessel tubes per lung: enough that an axial slice cuts about as many as the lesion phantoms
# draw (8-20 per lung).
VESSEL_TUBES = (30, 50)
# Slice levels (mm from the right dome's top) of single axial images: mostly chest, some
# through the lung bases and the liver dome.
AXIAL_LEVELS = (-50.0, 40.0)  # lowest level; highest = apex - 40


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid with a vertical axis: an in-plane ellipse at ``cz``, half-height ``az``."""

    base: Ellipse
    cz: float
    az: float

    def section(self, z: float) -> Ellipse | None:
        """The ellipse a slice at ``z`` cuts, or None when the slice misses it."""
        t = 1.0 - ((z - self.cz) / self.az) ** 2
        if t <= 0.01:
            return None
        s = float(np.sqrt(t))
        b = self.base
        return Ellipse(b.cx, b.cy, b.ax * s, b.ay * s, b.angle)


@dataclass(frozen=True)
class Dome:
    """A hemidiaphragm: the paraboloid ``z = top - dx^2 / 2rx - dy^2 / 2ry`` around (cx, cy)."""

    cx: float
    cy: float
    top: float
    rx: float
    ry: float

    def below(self, z: float) -> Ellipse | None:
        """The region under the dome at level ``z`` (None above its top)."""
        depth = self.top - z
        if depth <= 0:
            return None
        return Ellipse(self.cx, self.cy, np.sqrt(2 * self.rx * depth), np.sqrt(2 * self.ry * depth))


@dataclass(frozen=True)
class Tube:
    """A lung vessel: a tapering cylinder from ``p0`` (hilum side) to ``p1``."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r0: float
    r1: float

    def section(self, z: float) -> Ellipse | None:
        """The (oblique) cut of a slice at ``z`` through the tube, or None."""
        (x0, y0, z0), (x1, y1, z1) = self.p0, self.p1
        if not min(z0, z1) <= z <= max(z0, z1) or z0 == z1:
            return None
        t = (z - z0) / (z1 - z0)
        r = self.r0 + t * (self.r1 - self.r0)
        length = float(np.sqrt((x1 - x0) ** 2 + (y1 - y0) ** 2 + (z1 - z0) ** 2))
        stretch = min(length / abs(z1 - z0), 3.5)
        angle = float(np.arctan2(y1 - y0, x1 - x0))
        return Ellipse(x0 + t * (x1 - x0), y0 + t * (y1 - y0), r * stretch, r, angle)


@dataclass(frozen=True)
class Nodule:
    """A lobulated ball: its equator is ``lesion`` at level ``cz``."""

    lesion: Lesion
    cz: float

    def section(self, z: float) -> Lesion | None:
        """The nodule's outline in a slice at ``z``, or None when the slice misses it."""
        r = self.lesion.radius
        t = r * r - (z - self.cz) ** 2
        if t <= 0:
            return None
        return replace(self.lesion, radius=float(np.sqrt(t)))


@dataclass(frozen=True)
class Torso:
    """One patient's chest and upper abdomen; every length in mm."""

    body: Ellipse  # skin outline, the same at every level
    fat_mm: float
    wall_mm: float  # chest and abdominal wall (muscle, ribs) inside the fat
    apex: float  # level of the lung apices
    lungs: tuple[Ellipse, Ellipse]  # right, left: widest in-plane outline
    apex_round: float  # how far below the apex a lung reaches its widest
    domes: tuple[Dome, Dome]  # right, left hemidiaphragm
    heart: Ellipsoid
    pericardial_mm: float
    mediastinum: Ellipse  # upper mediastinum (fat, great vessels), above the heart
    aorta: Ellipse
    spine: Ellipse
    sternum: Ellipse
    ribs: tuple[tuple[float, float, float], ...]  # posterior level, anterior drop, half-height
    liver: Ellipse  # right lobe, under the right dome
    liver_bottom: float
    left_lobe: Ellipse
    stomach: Ellipsoid
    spleen: Ellipsoid
    vessels: tuple[Tube, ...]
    nodule: Nodule | None = None


def _jitter(rng: np.random.Generator, value: float, rel: float) -> float:
    return float(value * (1.0 + rng.uniform(-rel, rel)))


def sample_torso(rng: np.random.Generator) -> Torso:
    """Draw one patient: body habitus, organ sizes and positions, shape jitter."""
    u = rng.uniform
    hw, hh = _jitter(rng, 165, 0.12), _jitter(rng, 115, 0.12)
    cx, cy = u(-15, 15), u(-12, 12)
    body = Ellipse(cx, cy, hw, hh, u(-0.05, 0.05))
    lungs = tuple(
        Ellipse(
            cx + side * _jitter(rng, 0.5 * hw, 0.08),
            cy + u(-0.05, 0.1) * hh,
            _jitter(rng, (0.43 if side < 0 else 0.41) * hw, 0.1),
            _jitter(rng, 0.85 * hh, 0.1),
            side * u(0.05, 0.3),
        )
        for side in (-1, 1)
    )
    right_top = 0.0
    left_top = -u(10, 25)
    domes = (
        Dome(cx - _jitter(rng, 0.3 * hw, 0.2), cy - u(0.0, 0.2) * hh, right_top,
             _jitter(rng, 110, 0.2), _jitter(rng, 60, 0.2)),
        Dome(cx + _jitter(rng, 0.3 * hw, 0.2), cy - u(0.0, 0.2) * hh, left_top,
             _jitter(rng, 100, 0.2), _jitter(rng, 60, 0.2)),
    )
    az = _jitter(rng, 62, 0.12)
    heart = Ellipsoid(
        Ellipse(cx + _jitter(rng, 0.18 * hw, 0.35), cy - _jitter(rng, 0.2 * hh, 0.3),
                _jitter(rng, 0.33 * hw, 0.12), _jitter(rng, 0.45 * hh, 0.12), u(-0.6, -0.2)),
        left_top + az * u(0.75, 0.95), az,
    )
    apex = u(215, 265)
    mediastinum = Ellipse(cx + u(-5, 5), cy - 0.2 * hh, _jitter(rng, 26, 0.2), 0.55 * hh)
    spine = Ellipse(cx + u(-4, 4), cy + 0.72 * hh, _jitter(rng, 17, 0.15), _jitter(rng, 16, 0.15))
    aorta_r = _jitter(rng, 12, 0.2)
    aorta = Ellipse(spine.cx + u(10, 22), spine.cy - u(24, 32), aorta_r, aorta_r)
    sternum = Ellipse(cx + u(-4, 4), cy - 0.9 * hh, _jitter(rng, 14, 0.2), _jitter(rng, 6, 0.2))
    gap = _jitter(rng, 25, 0.1)
    drop = u(60, 100)
    ribs = tuple((apex - 15 - k * gap, drop, _jitter(rng, 6, 0.2)) for k in range(11))
    liver = Ellipse(cx - _jitter(rng, 0.3 * hw, 0.2), cy - u(0.0, 0.15) * hh,
                    _jitter(rng, 0.5 * hw, 0.12), _jitter(rng, 0.75 * hh, 0.12), u(-0.2, 0.2))
    left_lobe = Ellipse(cx + _jitter(rng, 0.1 * hw, 0.5), cy - _jitter(rng, 0.45 * hh, 0.15),
                        _jitter(rng, 0.3 * hw, 0.2), _jitter(rng, 0.28 * hh, 0.2), u(-0.3, 0.3))
    stomach = Ellipsoid(
        Ellipse(cx + _jitter(rng, 0.35 * hw, 0.15), cy - _jitter(rng, 0.15 * hh, 0.5),
                _jitter(rng, 0.2 * hw, 0.2), _jitter(rng, 0.3 * hh, 0.2), u(-0.5, 0.5)),
        left_top - u(50, 70), u(45, 65),
    )
    spleen = Ellipsoid(
        Ellipse(cx + _jitter(rng, 0.55 * hw, 0.08), cy + _jitter(rng, 0.45 * hh, 0.15),
                _jitter(rng, 0.15 * hw, 0.2), _jitter(rng, 0.3 * hh, 0.2), u(-1.0, -0.4)),
        left_top - u(40, 60), u(40, 55),
    )
    torso = Torso(
        body=body, fat_mm=_jitter(rng, 14, 0.5), wall_mm=_jitter(rng, 16, 0.25), apex=apex,
        lungs=(lungs[0], lungs[1]), apex_round=_jitter(rng, 75, 0.2), domes=domes,
        heart=heart, pericardial_mm=u(2, 6), mediastinum=mediastinum, aorta=aorta, spine=spine,
        sternum=sternum, ribs=ribs, liver=liver, liver_bottom=-u(150, 190),
        left_lobe=left_lobe, stomach=stomach, spleen=spleen, vessels=(),
    )
    return replace(torso, vessels=_vessels(rng, torso))


def _vessels(rng: np.random.Generator, torso: Torso) -> tuple[Tube, ...]:
    """Pulmonary vessels: from each hilum to random points of its lung, thinning outwards."""
    lo, hi = VESSEL_RADIUS_MM
    hilum_z = torso.heart.cz + 0.6 * torso.heart.az
    out = []
    for side, lung in zip((-1, 1), torso.lungs, strict=True):
        hilum = (lung.cx - side * 0.55 * lung.ax, lung.cy, hilum_z)
        for _ in range(int(rng.integers(*VESSEL_TUBES))):
            z1 = float(rng.uniform(AXIAL_LEVELS[0] - 20, torso.apex - 20))
            section = _lung_ellipse(torso, side, z1) or lung
            x1, y1 = section.sample_inside(rng, 3.0)
            start = tuple(h + d for h, d in zip(hilum, rng.uniform(-12, 12, 3), strict=True))
            r0 = hi * rng.uniform(0.5, 1.0)
            out.append(Tube((start[0], start[1], start[2]), (x1, y1, z1), r0, lo))
    return tuple(out)


def _lung_ellipse(torso: Torso, side: int, z: float) -> Ellipse | None:
    """A lung's outline at level ``z`` before any cut: it narrows to a round apex."""
    t = (torso.apex - z) / torso.apex_round
    if t <= 0.02:
        return None
    s = float(np.sqrt(min(t, 1.0)))
    lung = torso.lungs[0 if side < 0 else 1]
    return Ellipse(lung.cx, lung.cy, lung.ax * s, lung.ay * s, lung.angle)


def _shrunk(e: Ellipse, by: float) -> Ellipse:
    return Ellipse(e.cx, e.cy, max(e.ax - by, 1.0), max(e.ay - by, 1.0), e.angle)


def _grown(e: Ellipse, by: float) -> Ellipse:
    return Ellipse(e.cx, e.cy, e.ax + by, e.ay + by, e.angle)


class _Slice:
    """The signed distance fields of one level's structures on one set of points."""

    def __init__(self, torso: Torso, z: float, x: np.ndarray, y: np.ndarray) -> None:
        self.torso, self.z, self.x, self.y = torso, z, x, y
        shape = np.broadcast_shapes(x.shape, y.shape)
        self.far = np.full(shape, _FAR)

    def d(self, shape: Ellipse | None) -> np.ndarray:
        return self.far if shape is None else shape.distance(self.x, self.y)

    @functools.cached_property
    def below_domes(self) -> np.ndarray:
        """Under either hemidiaphragm (computed once: most structures are cut by it)."""
        return union(*(self.d(dome.below(self.z)) for dome in self.torso.domes))

    @functools.cached_property
    def cavity(self) -> np.ndarray:
        """Inside the chest and abdominal wall."""
        t = self.torso
        return self.d(_shrunk(t.body, t.fat_mm + t.wall_mm))

    def heart(self, grow: float = 0.0) -> np.ndarray:
        section = self.torso.heart.section(self.z)
        shape = None if section is None else _grown(section, grow)
        return minus(self.d(shape), self.below_domes)

    def above_heart(self) -> bool:
        heart = self.torso.heart
        return self.z > heart.cz + 0.5 * heart.az

    def lung(self, side: int) -> np.ndarray:
        t = self.torso
        fields = [self.d(_lung_ellipse(t, side, self.z)), self.cavity]
        holes = [
            self.below_domes,
            self.heart(t.pericardial_mm + 3.0),
            self.d(_grown(t.aorta, 3.0)),
            self.d(_grown(t.spine, 4.0)),
        ]
        if self.above_heart():
            holes.append(self.d(t.mediastinum))
        return minus(intersect(*fields), *holes)

    def liver(self) -> np.ndarray:
        t = self.torso
        if self.z <= t.liver_bottom:
            return self.far
        # The right lobe tapers towards its tip; the left lobe lies under both domes.
        taper = float(np.sqrt(min((self.z - t.liver_bottom) / 70.0, 1.0)))
        right = _shrunk(t.liver, (1.0 - taper) * min(t.liver.ax, t.liver.ay))
        lobe = self.d(t.left_lobe) if self.z > t.domes[1].top - 90 else self.far
        below = self.below_domes
        return intersect(union(intersect(self.d(right), self.d(t.domes[0].below(self.z))),
                               intersect(lobe, below)), self.cavity)

    def ribs(self) -> np.ndarray:
        """Distance-like field of the rib cross-sections: arcs in the chest wall."""
        t = self.torso
        body = t.body
        outer, inner = _shrunk(body, t.fat_mm + 2.0), _shrunk(body, t.fat_mm + 10.0)
        shell = minus(self.d(outer), self.d(inner))
        phi = np.abs(np.arctan2(self.x - body.cx, self.y - body.cy)) / np.pi  # 0 back, 1 front
        along = np.full(shell.shape, _FAR)
        # mm in the plane per mm of rib level along the wall, to turn a level gap into a distance
        per_mm = np.pi * body.ax / max(t.ribs[0][1], 1.0)
        for level, drop, half in t.ribs:
            along = np.minimum(along, (np.abs(self.z - (level - drop * phi)) - half) * per_mm)
        along = np.where(phi < 0.85, along, _FAR)  # costal cartilage: no rib in front
        return intersect(shell, along)


def lung_distance(torso: Torso, z: float, x: float, y: float) -> float:
    """Signed distance (mm) of point (x, y) at level ``z`` to the lung fields."""
    at = _Slice(torso, z, np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    return float(np.minimum(at.lung(-1), at.lung(1)))


def with_nodule(
    torso: Torso, rng: np.random.Generator, z: float, min_radius: float
) -> Torso | None:
    """The torso with a nodule centred in a lung at level ``z``; None if none fits there."""

    def candidate(margin: float) -> tuple[float, float]:
        side = (-1, 1)[int(rng.integers(2))]
        lung = _lung_ellipse(torso, side, z) or torso.lungs[0]
        return lung.sample_inside(rng, margin)

    lesion = place_lesion(
        rng, candidate, lambda x, y: lung_distance(torso, z, x, y), min_radius
    )
    return None if lesion is None else replace(torso, nodule=Nodule(lesion, z))


def render_slice(
    torso: Torso, z: float, grid: Grid, tissues: AnatomyTissues
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free axial slice at level ``z``: (image, body coverage, uint8 label map)."""
    t, v = torso, tissues.base
    canvas = Canvas(grid, v.air)
    at = _Slice(t, z, canvas.x, canvas.y)
    body = at.d(t.body)
    canvas.paint(body, v.fat, label=BODY)
    canvas.paint(at.d(_shrunk(t.body, t.fat_mm)), v.soft)
    cavity = at.cavity
    canvas.paint(intersect(cavity, at.below_domes), tissues.abdomen)
    for organ, value in ((t.spleen, tissues.spleen), (t.stomach, v.soft)):
        canvas.paint(intersect(at.d(organ.section(z)), cavity), value)
    stomach = t.stomach.section(z)
    if stomach is not None:  # swallowed air floats to the front of the stomach
        gas = Ellipse(stomach.cx, stomach.cy - 0.5 * stomach.ay, stomach.ax, 0.5 * stomach.ay)
        canvas.paint(intersect(at.d(gas), at.d(stomach)), v.air)
    canvas.paint(at.liver(), tissues.liver, label=LIVER)
    if at.above_heart():
        canvas.paint(at.d(t.mediastinum), v.fat)
    canvas.paint(at.heart(t.pericardial_mm), v.fat)
    canvas.paint(at.heart(), v.heart, label=HEART)
    canvas.paint(at.d(t.aorta), tissues.blood)
    canvas.paint(at.ribs(), v.bone)
    canvas.paint(at.d(t.spine), v.bone)
    if z > t.heart.cz - 0.6 * t.heart.az:
        canvas.paint(at.d(t.sternum), v.bone)
    right, left = at.lung(-1), at.lung(1)
    canvas.paint(right, v.lung, label=RIGHT_LUNG)
    canvas.paint(left, v.lung, label=LEFT_LUNG)
    lungs = np.minimum(right, left)
    lung_cover = canvas.cover(lungs)
    for tube in t.vessels:
        section = tube.section(z)
        if section is None:
            continue
        win = canvas.window(section.cx, section.cy, section.extent())
        dist = section.distance(canvas.x[:, win[1]], canvas.y[win[0]])
        canvas.paint(dist, v.vessel, weight=lung_cover[win], at=win)
    lesion = None if t.nodule is None else t.nodule.section(z)
    if lesion is not None:
        win = canvas.window(lesion.cx, lesion.cy, lesion.radius * 1.3)
        dist = intersect(lesion.outline(canvas.x[:, win[1]], canvas.y[win[0]]), lungs[win])
        step = lesion.contrast * (v.lesion - v.lung)
        canvas.paint(dist, v.lung + step, label=LESION, at=win)
    return canvas.image, canvas.cover(body), canvas.labels
