"""A labelled PA chest radiograph: lung fields, cardiac shadow, hemidiaphragms and liver.

Coordinates as in ``simulations.phantom``'s frontal view: mm from the detector centre, ``x``
to the patient's left (columns; the patient's right is on the image's left, as a PA film is
read), ``y`` down the image. A lung field is an ellipse with the hemidiaphragm's dome cut from
its base (leaving a costophrenic angle at the side) and the mediastinum from its medial edge;
the liver fills the right dome and reaches under the left one; the stomach's gas bubble sits
under the left dome. The cardiac shadow lies over the left lower mediastinum and the medial
lung fields and wins over them in the label map, as lung fields are drawn on chest films (the
lung behind the heart is not visible as lung). Labels follow ``simulations.anatomy``.
"""

from __future__ import annotations

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
from simulations.phantom import Ellipse, Grid, Lesion, frontal_frame, rib_shadows


@dataclass(frozen=True)
class Film:
    """One patient's chest as a PA radiograph projects it; lengths in mm."""

    body: Ellipse
    lungs: tuple[Ellipse, Ellipse]  # right, left, before any cut
    mediastinum: Ellipse  # a tall band between the lungs
    domes: tuple[Ellipse, Ellipse]  # right, left: the region under each hemidiaphragm
    left_lobe: Ellipse
    bubble: Ellipse  # gastric air under the left dome
    heart: Ellipse
    spine: Ellipse
    vessels: tuple[Ellipse, ...]
    ribs: tuple[tuple[float, float, float, float], ...]  # (y0, curvature, side, half-width)
    lesion: Lesion | None = None


def _jitter(rng: np.random.Generator, value: float, rel: float) -> float:
    return float(value * (1.0 + rng.uniform(-rel, rel)))


def sample_film(rng: np.random.Generator, *, lesion: bool, min_radius: float) -> Film:
    """Draw one patient's chest film (and a nodule in a lung field if ``lesion``)."""
    u = rng.uniform
    cx = u(-12, 12)
    # Narrower than the detector, so direct-exposure air frames the chest as on real films.
    body = Ellipse(cx, u(30, 70), _jitter(rng, 140, 0.1), _jitter(rng, 290, 0.1))
    top = u(-160, -130)
    height = _jitter(rng, 285, 0.08)  # apex to costophrenic angle
    lungs = tuple(
        Ellipse(
            cx + side * _jitter(rng, 0.5 * body.ax, 0.06),
            top + height / 2,
            _jitter(rng, (0.5 if side < 0 else 0.48) * body.ax, 0.08),
            height / 2,
            side * u(-0.1, 0.02),
        )
        for side in (-1, 1)
    )
    right_top = top + height * u(0.76, 0.84)
    left_top = right_top + u(10, 25)
    domes = tuple(
        Ellipse(cx + side * _jitter(rng, 0.42 * body.ax, 0.1), dome_top + (ry := u(70, 95)),
                _jitter(rng, 0.55 * body.ax, 0.1), ry, side * u(-0.15, 0.05))
        for side, dome_top in ((-1, right_top), (1, left_top))
    )
    mediastinum = Ellipse(cx + u(-3, 3), top + height / 2, _jitter(rng, 22, 0.2), height)
    left_lobe = Ellipse(cx + u(0, 25), left_top + u(35, 55), _jitter(rng, 65, 0.2),
                        _jitter(rng, 45, 0.2))
    bubble = Ellipse(domes[1].cx + u(-10, 15), left_top + u(15, 30), _jitter(rng, 28, 0.3),
                     _jitter(rng, 16, 0.3))
    heart = Ellipse(cx + _jitter(rng, 35, 0.3), left_top - _jitter(rng, 45, 0.2),
                    _jitter(rng, 70, 0.12), _jitter(rng, 55, 0.12), u(-0.5, -0.1))
    spine, vessels, ribs = frontal_frame(rng, lungs, cx, top)
    film = Film(body, (lungs[0], lungs[1]), mediastinum, (domes[0], domes[1]), left_lobe,
                bubble, heart, spine, vessels, ribs)
    if not lesion:
        return film

    def candidate(margin: float) -> tuple[float, float]:
        return film.lungs[int(rng.integers(2))].sample_inside(rng, margin)

    def distance(x: float, y: float) -> float:
        at = _Fields(film, np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        return float(np.minimum(at.lung(0), at.lung(1)))

    placed = place_lesion(rng, candidate, distance, min_radius)
    if placed is None:  # lung fields are wide and min_radius is about a pixel: cannot happen
        raise RuntimeError("no place in the sampled lung fields holds a nodule")
    return replace(film, lesion=placed)


class _Fields:
    """Signed distance fields of a film's structures on one set of points."""

    def __init__(self, film: Film, x: np.ndarray, y: np.ndarray) -> None:
        self.film, self.x, self.y = film, x, y

    def d(self, shape: Ellipse) -> np.ndarray:
        return shape.distance(self.x, self.y)

    def domes(self) -> np.ndarray:
        return union(*(self.d(dome) for dome in self.film.domes))

    def heart(self) -> np.ndarray:
        # The heart's lower border rests on the diaphragm.
        return minus(self.d(self.film.heart), self.domes())

    def lung(self, index: int) -> np.ndarray:
        f = self.film
        inside = Ellipse(f.body.cx, f.body.cy, f.body.ax - 12.0, f.body.ay - 12.0)
        return minus(
            intersect(self.d(f.lungs[index]), self.d(inside)),
            self.domes(), self.d(f.mediastinum), self.heart(),
        )

    def liver(self) -> np.ndarray:
        f = self.film
        lobe = intersect(self.d(f.left_lobe), self.domes())
        return intersect(union(self.d(f.domes[0]), lobe), self.d(f.body))


def render_film(
    film: Film, grid: Grid, tissues: AnatomyTissues
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free radiograph of ``film``: (image, body coverage, uint8 label map)."""
    v = tissues.base
    canvas = Canvas(grid, v.air)
    at = _Fields(film, canvas.x, canvas.y)
    body = at.d(film.body)
    canvas.paint(body, v.soft, label=BODY)
    canvas.paint(intersect(at.domes(), body), tissues.abdomen)
    canvas.paint(at.liver(), tissues.liver, label=LIVER)
    # gas in the stomach: darker than the abdomen, brighter than lung (bowel wall, overlap)
    canvas.paint(intersect(at.d(film.bubble), at.d(film.domes[1])),
                 0.5 * (v.lung + tissues.abdomen))
    right, left = at.lung(0), at.lung(1)
    canvas.paint(right, v.lung, label=RIGHT_LUNG)
    canvas.paint(left, v.lung, label=LEFT_LUNG)
    lungs = np.minimum(right, left)
    lung_cover = canvas.cover(lungs)
    # The heart in front of the lungs: retrocardiac lung keeps its shadow fainter there.
    behind = canvas.cover(minus(
        union(*(at.d(lung) for lung in film.lungs)), at.d(film.mediastinum), at.domes()
    ))
    canvas.paint(at.heart(), v.heart, label=HEART, weight=1.0 - 0.6 * behind)
    body_cover = canvas.cover(body)
    # Projected structures add their attenuation to whatever lies in front of or behind them.
    canvas.paint(at.d(film.spine), 0.3 * (v.bone - v.soft), weight=body_cover, add=True)
    for vessel in film.vessels:
        win = canvas.window(vessel.cx, vessel.cy, vessel.extent())
        dist = vessel.distance(canvas.x[:, win[1]], canvas.y[win[0]])
        canvas.paint(dist, v.vessel - v.lung, weight=lung_cover[win], add=True, at=win)
    ribs = rib_shadows(film.ribs, film.spine.cx, film.lungs, canvas.x[0], canvas.y[:, 0],
                       canvas.edge)
    canvas.image += 0.25 * (v.bone - v.soft) * ribs * body_cover
    if film.lesion is not None:
        lesion = film.lesion
        win = canvas.window(lesion.cx, lesion.cy, lesion.radius * 1.3)
        dist = intersect(lesion.outline(canvas.x[:, win[1]], canvas.y[win[0]]), lungs[win])
        step = lesion.contrast * (v.lesion - v.lung)
        canvas.paint(dist, step, label=LESION, add=True, at=win)
    return canvas.image, canvas.cover(body), canvas.labels

