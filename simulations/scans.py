"""Labelled images and volumes of the anatomical phantoms, as a site's scanner records them.

``anatomical_image`` is one 2D image (an axial slice at a random level for CT and MR, a PA film
for radiography) with its label map; ``anatomical_volume`` a stack of axial slices through one
patient, scanned as one acquisition (one shading field, texture and blur that are smooth across
slices, independent noise), with its label volume. Labels follow ``simulations.anatomy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from simulations.anatomy import AnatomyTissues
from simulations.film import render_film, sample_film
from simulations.phantom import Scanner, scan, shading, with_noise
from simulations.torso import AXIAL_LEVELS, render_slice, sample_torso, with_nodule

# The lowest slice of a volume lies this far (mm) from the right dome's top, so that every
# volume shows the lung bases, the heart and the top of the liver.
VOLUME_START = (-70.0, -20.0)
_LEVEL_TRIES = 50


@dataclass(frozen=True)
class VolumeProtocol:
    """A site's volume acquisition: ``slices`` axial slices ``thickness`` mm apart."""

    slices: int
    thickness: float


def anatomical_image(
    scanner: Scanner, tissues: AnatomyTissues, rng: np.random.Generator, *, lesion: bool,
    min_radius: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One image of a new patient on ``scanner``: (float32 image, uint8 label map)."""
    if scanner.view == "frontal":
        film = sample_film(rng, lesion=lesion, min_radius=min_radius)
        image, body, labels = render_film(film, scanner.grid, tissues)
        return scan(image, body, scanner, rng), labels
    torso = sample_torso(rng)
    top = torso.apex - 40.0
    for _ in range(_LEVEL_TRIES):
        z = float(rng.uniform(AXIAL_LEVELS[0], top))
        placed = with_nodule(torso, rng, z, min_radius) if lesion else torso
        if placed is not None:
            break
    else:  # no lung level was wide enough: cannot happen with the sampled sizes, but be exact
        raise RuntimeError("no slice level of the sampled torso holds a nodule")
    image, body, labels = render_slice(placed, z, scanner.grid, tissues)
    return scan(image, body, scanner, rng), labels


def volume_levels(protocol: VolumeProtocol, rng: np.random.Generator) -> np.ndarray:
    """Slice levels (mm, inferior first) of one patient's volume."""
    start = float(rng.uniform(*VOLUME_START))
    return start + protocol.thickness * np.arange(protocol.slices)


def anatomical_volume(
    scanner: Scanner, tissues: AnatomyTissues, protocol: VolumeProtocol,
    rng: np.random.Generator, *, lesion: bool, min_radius: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One patient's axial volume: (float32 (S, H, W) image, uint8 labels, levels in mm).

    Slices run inferior to superior. A lesion is centred on one slice (its equator), so every
    lesion-positive volume shows it.
    """
    torso = sample_torso(rng)
    levels = volume_levels(protocol, rng)
    if lesion:
        for _ in range(_LEVEL_TRIES):
            # Not the outermost slices: the nodule's upper and lower halves stay in the volume.
            z = float(levels[int(rng.integers(2, max(3, len(levels) - 2)))])
            placed = with_nodule(torso, rng, z, min_radius)
            if placed is not None:
                torso = placed
                break
        else:
            raise RuntimeError("no slice level of the sampled torso holds a nodule")
    rendered = [render_slice(torso, float(z), scanner.grid, tissues) for z in levels]
    image = np.stack([r[0] for r in rendered])
    body = np.stack([r[1] for r in rendered])
    labels = np.stack([r[2] for r in rendered])
    return _scan_volume(image, body, scanner, protocol.thickness, rng), labels, levels


def _scan_volume(
    image: np.ndarray, body: np.ndarray, scanner: Scanner, thickness: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """What ``scanner`` records of a noise-free volume, as `scan` does for one slice."""
    grid = scanner.grid
    sigma = np.array([thickness, *grid.spacing])
    if scanner.texture > 0:
        field = ndimage.gaussian_filter(rng.standard_normal(image.shape), 2.5 / sigma)
        image = image + scanner.texture * body * field / max(float(field.std()), 1e-6)
    if scanner.bias > 0:
        image = image * shading(grid, scanner.bias, rng)[None]
    # In-plane blur only: the slice profile is the slice thickness itself.
    image = ndimage.gaussian_filter(image, [0.0, *(scanner.blur_mm / sigma[1:])])
    return with_noise(image, scanner, rng)
