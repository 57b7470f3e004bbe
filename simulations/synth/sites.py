"""The synthetic hospitals: each site's scanner, encoding and case mix, drawn from the seed."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from pydicom.pixels import get_encoder
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from simulations.anatomy import LABELS, LESION_ONLY, AnatomyTissues, organ_tissues
from simulations.phantom import Grid, Scanner, TissueValues
from simulations.scans import VolumeProtocol
from simulations.synth.layout import MIN_IMAGES, _Layout

PREVALENCE_RANGE = (0.15, 0.60)
SIZE_FACTOR_RANGE = (0.5, 1.5)


# Volumes (--dims 3): slices per volume, slice spacing (mm) and in-plane pixels per side, per
# site; modest, so that training on them stays feasible on CPUs.
VOLUME_SLICES = (32, 48)
VOLUME_THICKNESS_MM = (3.0, 5.0)
VOLUME_SIDES = (64, 80, 96)

# (modality, photometric interpretation, transfer syntax) of site i is _ARCHETYPES[i % 5].
_ARCHETYPES: tuple[tuple[str, str, UID], ...] = (
    ("CT", "MONOCHROME2", ExplicitVRLittleEndian),
    ("MR", "MONOCHROME2", RLELossless),
    ("DX", "MONOCHROME1", JPEGLSLossless),
    ("CT", "MONOCHROME2", JPEG2000Lossless),
    ("CR", "MONOCHROME2", RLELossless),
)
# Volumes are axial: radiography sites become MR and CT sites.
_VOLUME_ARCHETYPES: tuple[tuple[str, str, UID], ...] = (
    ("CT", "MONOCHROME2", ExplicitVRLittleEndian),
    ("MR", "MONOCHROME2", RLELossless),
    ("MR", "MONOCHROME2", JPEGLSLossless),
    ("CT", "MONOCHROME2", JPEG2000Lossless),
    ("CT", "MONOCHROME2", RLELossless),
)


_VENDORS = {
    "CT": (("SIEMENS", "SOMATOM Definition AS"), ("GE MEDICAL SYSTEMS", "Revolution CT"),
           ("Canon Medical Systems", "Aquilion ONE"), ("Philips", "Ingenuity CT")),
    "MR": (("SIEMENS", "MAGNETOM Vida"), ("GE MEDICAL SYSTEMS", "SIGNA Premier"),
           ("Philips Medical Systems", "Ingenia")),
    "DX": (("Philips Medical Systems", "DigitalDiagnost"), ("Carestream Health", "DRX-Evolution"),
           ("SIEMENS", "Ysio Max")),
    "CR": (("FUJIFILM Corporation", "FCR Capsula XL II"), ("Agfa", "CR 85-X"),
           ("Carestream Health", "DirectView CR 975")),
}
_INSTITUTIONS = (
    "Northvale General Hospital", "St. Brigid Medical Center", "Riverside University Hospital",
    "Lakeshore Regional Hospital", "Mount Calder Infirmary", "Eastbrook Community Hospital",
    "Westmere Teaching Hospital", "Harrowgate Chest Clinic", "Kingsford Memorial Hospital",
    "Aldermoor Health Campus",
)


# Nodules are soft-tissue dense on CT and radiographs and T2-bright on MR.
_CT_TISSUES = TissueValues(
    air=-1000, fat=-100, soft=45, lung=-860, heart=40, bone=600, vessel=40, lesion=45
)
_MR_TISSUES = (  # T1-like (bright fat, grey vessels) and T2-like (dark blood / flow voids)
    TissueValues(air=0.0, fat=1.0, soft=0.4, lung=0.12, heart=0.5, bone=0.6, vessel=0.32,
                 lesion=0.75),
    TissueValues(air=0.0, fat=0.8, soft=0.35, lung=0.1, heart=0.15, bone=0.45, vessel=0.2,
                 lesion=0.8),
)
_XR_TISSUES = TissueValues(
    air=0.0, fat=0.5, soft=0.55, lung=0.22, heart=0.78, bone=0.88, vessel=0.3, lesion=0.55
)


@dataclass(frozen=True)
class SiteProfile:
    """One hospital's scanner, encoding and case mix.

    ``stored = (value - intercept) / slope`` maps the scanner's physical value to stored pixels
    (``gamma`` first, for radiographs); MONOCHROME1 then stores ``max - stored``.
    """

    index: int
    name: str
    institution: str
    manufacturer: str
    model: str
    modality: str
    photometric: str
    transfer_syntax: UID
    scanner: Scanner
    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    gamma: float
    window: tuple[float, float] | None
    rescale_tags: bool
    prevalence: float
    n_images: int
    station: str
    organs: AnatomyTissues | None = None  # anatomical phantoms (--masks anatomy, --dims 3)
    protocol: VolumeProtocol | None = None  # volumes (--dims 3)


@dataclass(frozen=True)
class _Style:
    """What every image of one synthesis is: its mask kind and dimensions."""

    masks: str = "lesion"
    dims: int = 2

    @property
    def anatomical(self) -> bool:
        """Whether images come from the anatomical phantoms (``simulations.torso``, ``film``)."""
        return self.masks == "anatomy" or self.dims == 3

    def mask_labels(self) -> dict[int, str]:
        """The values the masks hold and what each means."""
        return LABELS if self.masks == "anatomy" else LESION_ONLY


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # One independent stream per (purpose, site, image): adding a site or an image never
    # changes what the others look like.
    return np.random.default_rng([seed, *stream])


def _spread(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """``n`` values in [lo, hi), one per equal stratum in random order, so sites always differ."""
    return lo + (hi - lo) * (rng.permutation(n) + rng.uniform(size=n)) / n


def _site_profiles(
    n_sites: int, images_per_site: int, seed: int, layout: _Layout | None = None,
    style: _Style | None = None,
) -> list[SiteProfile]:
    style = style or _Style()
    archetypes = _VOLUME_ARCHETYPES if style.dims == 3 else _ARCHETYPES
    rng = _rng(seed, 0)
    prevalence = _spread(rng, n_sites, *PREVALENCE_RANGE)
    factor = _spread(rng, n_sites, *SIZE_FACTOR_RANGE)
    if layout is not None and layout.label_alpha is not None:
        # its own stream: the draws above (and so the default layout) stay as they were
        share = _rng(seed, 6).beta(layout.label_alpha, layout.label_alpha, size=n_sites)
        # a tiny alpha can round a share to exactly 0 or 1, which would read as a one-class site
        prevalence = np.clip(share, 1e-9, 1 - 1e-9)
    profiles = []
    for i in range(n_sites):
        n = max(MIN_IMAGES, round(images_per_site * factor[i]))
        p = float(prevalence[i])
        if layout is not None:
            n = n if layout.sizes is None else layout.sizes[i]
            only = layout.one_class[i]
            p = p if only is None else float(only)
        profile = _site_profile(i + 1, _rng(seed, 1, i + 1), p, n, archetypes)
        if style.anatomical:
            # their own streams: the lesion phantoms' sites stay as they were
            organs = organ_tissues(profile.modality, profile.scanner.tissues,
                                   _rng(seed, 7, i + 1))
            profile = replace(profile, organs=organs)
        if style.dims == 3:
            profile = _volume_site(profile, _rng(seed, 8, i + 1))
        profiles.append(profile)
    return profiles


def _volume_site(profile: SiteProfile, rng: np.random.Generator) -> SiteProfile:
    """The site's volume protocol: a coarser in-plane grid, its slice count and spacing."""
    scanner = profile.scanner
    cols = int(rng.choice(VOLUME_SIDES))
    fov = scanner.grid.cols * scanner.grid.spacing[1]
    rows = cols if scanner.grid.rows == scanner.grid.cols else int(
        round(cols * scanner.grid.rows / scanner.grid.cols / 8) * 8
    )
    grid = Grid(rows, cols, (fov / cols, fov / cols))
    protocol = VolumeProtocol(
        int(rng.integers(VOLUME_SLICES[0], VOLUME_SLICES[1] + 1)),
        float(rng.choice(np.arange(VOLUME_THICKNESS_MM[0], VOLUME_THICKNESS_MM[1] + 0.1, 0.5))),
    )
    return replace(profile, scanner=replace(scanner, grid=grid), protocol=protocol)


def _site_profile(
    index: int, rng: np.random.Generator, prevalence: float, n: int,
    archetypes: tuple[tuple[str, str, UID], ...] = _ARCHETYPES,
) -> SiteProfile:
    modality, photometric, syntax = archetypes[(index - 1) % len(archetypes)]
    if syntax.is_compressed and not get_encoder(syntax).is_available:
        # A missing optional codec must not stop the synthesis; the data stay valid DICOM.
        syntax = ExplicitVRLittleEndian
    vendors = _VENDORS[modality]
    manufacturer, model = vendors[int(rng.integers(len(vendors)))]
    institution = _INSTITUTIONS[(index - 1) % len(_INSTITUTIONS)]
    if index > len(_INSTITUTIONS):
        institution += f" Campus {(index - 1) // len(_INSTITUTIONS) + 1}"
    u = rng.uniform

    def jitter(t: TissueValues, rel: float, offset: float = 0.0) -> TissueValues:
        values = {k: v * (1 + u(-rel, rel)) + (offset if k != "air" else 0.0)
                  for k, v in vars(t).items()}
        return TissueValues(**values)

    window: tuple[float, float] | None = None
    gamma = 1.0
    if modality == "CT":
        side = int(rng.choice([128, 160, 192]))
        spacing = u(360, 440) / side
        grid = Grid(side, side, (spacing, spacing))
        # CT numbers vary a little between calibrations; the lung window follows the site.
        scanner = Scanner("axial", grid, jitter(_CT_TISSUES, 0.0, u(-15, 15)), u(0.6, 1.5),
                          u(10, 35), u(15, 35), 0.0)
        bits, signed, slope, intercept = int(rng.choice([12, 16])), True, 1.0, -1024.0
        window = (round(u(-650, -500)), round(u(1300, 1700)))
    elif modality == "MR":
        cols = int(rng.choice([128, 160, 192]))
        rows = int(round(cols * u(0.72, 0.9) / 16) * 16)
        spacing = u(380, 440) / cols
        tissues = jitter(_MR_TISSUES[int(rng.integers(2))], 0.1)
        scanner = Scanner("axial", Grid(rows, cols, (spacing, spacing)), tissues, u(0.9, 1.8),
                          u(0.015, 0.035), u(0.01, 0.03), u(0.15, 0.35), rician=True)
        # MR has no physical unit: every site scales (and offsets) its images its own way.
        scale = u(400, 3500)
        bits, signed, slope, intercept = 12 if scale < 2500 else 16, False, 1 / scale, -u(0, 80)
        intercept /= scale
    else:
        cols = int(rng.choice([96, 112, 128, 144]))
        rows = min(192, int(round(cols * u(1.15, 1.3))))
        spacing = u(390, 430) / rows
        scanner = Scanner("frontal", Grid(rows, cols, (spacing, spacing)),
                          jitter(_XR_TISSUES, 0.06), u(1.0, 2.2), u(0.01, 0.025), 0.01,
                          u(0.04, 0.12))
        bits, signed, gamma = int(rng.choice([10, 12, 14])), False, u(0.75, 1.35)
        top = 2**bits - 1
        slope, intercept = 1 / (top * u(0.7, 0.9)), -u(0.02, 0.08)
    return SiteProfile(
        index=index,
        name=f"hospital-{index:02d}",
        institution=institution,
        manufacturer=manufacturer,
        model=model,
        modality=modality,
        photometric=photometric,
        transfer_syntax=syntax,
        scanner=scanner,
        bits_stored=bits,
        signed=signed,
        slope=slope,
        intercept=intercept,
        gamma=gamma,
        window=window,
        rescale_tags=modality == "CT",
        prevalence=prevalence,
        n_images=n,
        station=f"{modality}{index:02d}{int(rng.integers(1, 9))}",
    )


def _site_labels(profile: SiteProfile, seed: int) -> np.ndarray:
    if profile.prevalence in (0.0, 1.0):  # a one-class site
        n_pos = round(profile.prevalence * profile.n_images)
    else:  # a mixed site keeps both classes, however skewed its share
        n_pos = min(profile.n_images - 1, max(1, round(profile.prevalence * profile.n_images)))
    return _rng(seed, 2, profile.index, 0).permutation(np.arange(profile.n_images) < n_pos)
