"""Synthetic multi-hospital chest data in real formats: the engine of ``medfed synth``.

No public dataset can be downloaded here, so this is every user's default data. It writes::

    out/sites/hospital-01/labels.csv        path,label,mask,split (train/val/test ~ 70/15/15)
    out/sites/hospital-01/images/img_0001.dcm
    out/sites/hospital-01/masks/img_0001.nii.gz
    ...
    out/test/labels.csv                      held-out patients, every split is "test"
    out/identifiers.json                     every fake PatientName / PatientID written
    out/dataset_info.json                    what labels and mask values mean (num_classes)

Each DICOM holds one 2D image; label 1 means a lung nodule is present. Each mask is a uint8 NIfTI
of shape ``(Rows, Columns)`` (2D, rows along axis 0 exactly as ``pixel_array``), 1 inside the
lesion and all zeros for normals. Its affine maps (row, col) to RAS millimetres: the zooms are
``PixelSpacing`` and for CT/MR the translation is ``ImagePositionPatient`` (LPS flipped to RAS);
radiographs have no patient frame, so there it only carries the spacing.

Sites differ the way hospitals do (non-IID): modality and view (CT and MR store axial slices,
DX and CR store frontal radiographs, one of them MONOCHROME1), vendor, grid size (96 to 192 pixels
per side) and pixel spacing, intensity scale and offset, noise, blur, transfer syntax (explicit
little endian, RLE, JPEG-LS and JPEG 2000 lossless), lesion prevalence (15% to 60%) and size
(0.5x to 1.5x ``images_per_site``). Site ``i`` takes archetype ``i mod 5`` (CT, MR, DX, CT, CR),
so any federation of five or more sites holds every style; everything else follows from ``seed``,
and reruns with the same seed write byte-identical files (UIDs included).

Difficulty: most lesions are conspicuous and a CNN learns them within a few epochs; a fixed share
is subtle (small and faint, below what a 64-pixel input resolves), which caps the achievable AUC
below 1. Calibrated with ``medfed central`` (15 epochs, 64-pixel input) on four 160-image sites:
held-out AUC 0.928, 0.915 and 0.902 for seeds 0, 1 and 2.

Anatomy (``masks="anatomy"``, off by default): the images come from the anatomical phantoms
(``simulations.torso`` for axial slices at random levels, ``simulations.film`` for PA films) and
each mask is a label map of ``simulations.anatomy.LABELS``. Volumes (``dims=3``): every site is CT
or MR, each row of labels.csv is a DICOM series folder (``images/vol_0001/slice_001.dcm``...) of
one patient's axial volume, its mask a 3D NIfTI on the series' grid (see
``simulations.series``). Both draw from their own random streams: the default output is the
same as before either existed.

Hard layouts (all off by default; the default output is unchanged): ``site_sizes`` gives each
site's image count (tiny referral clinics of 20-80 images beside large hospitals);
``label_alpha`` draws each site's lesion share from Beta(alpha, alpha), the two-class Dirichlet
label skew of Hsu et al. (2019), instead of spreading it over 15%-60%; ``one_class_sites`` K makes
the last K sites hold one class only (normal, lesion, normal, ... in turn, as referral and
screening clinics do, and as ``shared/data/make_sites.py --one-class-sites`` lays out real data);
``test_prevalence`` sets the lesion share of ``out/test`` (default 50%), so a model calibrated to
the training mix meets a different one.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from common.outputs import note, prepare
from simulations import series
from simulations.anatomy import LABELS, LESION, LESION_ONLY, AnatomyTissues, organ_tissues
from simulations.phantom import (
    Grid,
    Scanner,
    TissueValues,
    acquire,
    min_lesion_radius,
    sample_phantom,
)
from simulations.scans import VolumeProtocol, anatomical_image, anatomical_volume

SITE_SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
PREVALENCE_RANGE = (0.15, 0.60)
SIZE_FACTOR_RANGE = (0.5, 1.5)
MIN_IMAGES = 10
MASK_KINDS = ("lesion", "anatomy")
DIMS = (2, 3)
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
_SOP_CLASS = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "CR": ComputedRadiographyImageStorage,
}
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
_FAMILY = (
    "Smith", "Jensen", "Garcia", "Muller", "Rossi", "Novak", "Kowalski", "Dubois", "Silva",
    "Andersen", "Okafor", "Tanaka", "Nguyen", "Petrov", "Haddad", "Larsen", "Moreau", "Fischer",
    "Costa", "Murphy", "Schmidt", "Ivanova", "Bakker", "Lindqvist", "Yilmaz", "Kim", "Mensah",
    "Horvath", "OConnor", "Ferreira",
)
_GIVEN = {
    "F": ("Anna", "Maria", "Sofia", "Emma", "Ingrid", "Amara", "Yuki", "Lena", "Chloe", "Ewa",
          "Fatima", "Grace", "Hanna", "Ines", "Julia"),
    "M": ("Lars", "Jan", "Marco", "Pierre", "Ahmed", "Kenji", "Tomas", "Luca", "David", "Oscar",
          "Erik", "Felix", "Hugo", "Ivan", "Kwame"),
}
# Typical tissue values before per-site jitter (CT in HU; MR and radiographs in relative units).
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
class SynthSummary:
    """What :func:`synthesize` wrote: site names, images and lesion fraction per site."""

    out: Path
    sites: list[str]
    images: dict[str, int]
    test_images: int
    positives: dict[str, float]
    test_positives: int = 0


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


def synthesize(
    out: Path,
    *,
    sites: int,
    images_per_site: int = 200,
    seed: int = 0,
    test_images: int | None = None,
    overwrite: bool = False,
    labelled_fraction: float = 1.0,
    site_sizes: Sequence[int] | None = None,
    one_class_sites: int = 0,
    label_alpha: float | None = None,
    test_prevalence: float | None = None,
    masks: str = "lesion",
    dims: int = 2,
) -> SynthSummary:
    """Write ``sites`` synthetic hospital folders and a held-out test folder under ``out``.

    Args:
        images_per_site: mean site size; each site scales it by a factor in 0.5..1.5.
        test_images: size of ``out/test`` (default ``max(200, 2 * images_per_site)``), with
            about 50% lesions and each image in the scanner style of a randomly chosen site.
        labelled_fraction: share of each site's training rows that keep their label; the
            others get an empty label (unlabelled: classification skips them, an autoencoder
            learns from them). Validation, site test and ``out/test`` rows stay labelled.
        overwrite: replace ``sites/``, ``test/`` and ``identifiers.json`` in a non-empty ``out``
            (the CLI's ``--force``); other files there are left alone.
        site_sizes: images of each site, one per site (then ``images_per_site`` only sizes the
            default ``out/test``).
        one_class_sites: the last K sites hold one class only: 0 (normal), 1, 0, ... in turn.
        label_alpha: each mixed site's lesion share ~ Beta(alpha, alpha) (small alpha: sites
            dominated by one class; every mixed site keeps at least one image of each class).
        test_prevalence: lesion share of ``out/test`` (default 0.5).
        masks: "lesion" (0/1 lesion masks on the lesion phantoms) or "anatomy" (label maps of
            ``simulations.anatomy.LABELS`` on the anatomical phantoms).
        dims: 2 (one image per DICOM file) or 3 (one axial volume per patient: a DICOM series
            folder per row, a 3D NIfTI mask; every site is CT or MR).

    Raises:
        ValueError: an argument is out of range (the message names its CLI flag).
        FileExistsError: ``out`` is a file, or a non-empty folder and ``overwrite`` is false.

    """
    if sites < 1:
        raise ValueError(f"--sites must be >= 1, got {sites}")
    if images_per_site < MIN_IMAGES:
        raise ValueError(f"--images-per-site must be >= {MIN_IMAGES}, got {images_per_site}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if not 0 < labelled_fraction <= 1:
        raise ValueError(f"--labelled-fraction must be in (0, 1], got {labelled_fraction}")
    n_test = max(200, 2 * images_per_site) if test_images is None else test_images
    if n_test < MIN_IMAGES:
        raise ValueError(f"--test-images must be >= {MIN_IMAGES}, got {n_test}")
    if masks not in MASK_KINDS:
        raise ValueError(f"--masks must be one of {', '.join(MASK_KINDS)}, got {masks!r}")
    if dims not in DIMS:
        raise ValueError(f"--dims must be 2 (images) or 3 (volumes), got {dims}")
    layout = _hard_layout(sites, site_sizes, one_class_sites, label_alpha, test_prevalence, n_test)
    out = Path(out)
    _prepare(out, overwrite)

    style = _Style(masks, dims)
    profiles = _site_profiles(sites, images_per_site, seed, layout, style)
    identifiers: dict[str, dict[str, list[str]]] = {}
    for profile in profiles:
        labels = _site_labels(profile, seed)
        splits = _stratified_splits(labels, _rng(seed, 2, profile.index))
        jobs = [(profile, int(y), s) for y, s in zip(labels, splits, strict=True)]
        identifiers[profile.name] = _write_folder(
            out / "sites" / profile.name, jobs, seed, labelled_fraction, profile.index, style
        )
    rng = _rng(seed, 3)
    test_labels = rng.permutation(np.arange(n_test) < layout.test_positives)
    scanners = rng.integers(len(profiles), size=n_test)
    test_jobs = [(profiles[int(i)], int(y), "test") for i, y in zip(scanners, test_labels,
                                                                    strict=True)]
    identifiers["test"] = _write_folder(out / "test", test_jobs, seed, 1.0, 0, style)
    (out / "identifiers.json").write_text(json.dumps(identifiers, indent=1) + "\n")
    _write_info(out, style, seed, profiles, n_test, layout.test_positives)

    return SynthSummary(
        out=out,
        sites=[p.name for p in profiles],
        images={p.name: p.n_images for p in profiles},
        test_images=n_test,
        positives={p.name: round(p.prevalence, 4) for p in profiles},
        test_positives=layout.test_positives,
    )


INFO_FILE = "dataset_info.json"


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


def _write_info(
    out: Path, style: _Style, seed: int, profiles: list[SiteProfile], n_test: int,
    test_positives: int,
) -> None:
    """OUT/dataset_info.json: what the masks' values mean (``num_classes``) and what is where."""
    mask_labels = style.mask_labels()
    info = {
        "generator": "medfed synth",
        "seed": seed,
        "masks": style.masks,
        "dims": style.dims,
        "images": "one DICOM series folder per volume" if style.dims == 3
        else "one DICOM file per image",
        "labels": {"0": "no lung nodule", "1": "lung nodule"},
        "mask_labels": {str(k): name for k, name in mask_labels.items()},
        # classes a segmentation model needs, background included
        "num_classes": len(mask_labels),
        "folders": {
            **{p.name: {"modality": p.modality, "images": p.n_images,
                        "lesions": int(_site_labels(p, seed).sum())} for p in profiles},
            "test": {"images": n_test, "lesions": test_positives},
        },
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")


@dataclass(frozen=True)
class _Layout:
    """The hard-layout arguments, checked: what each site holds and the test set's lesions."""

    sizes: tuple[int, ...] | None
    one_class: tuple[int | None, ...]  # per site: None (both classes) or its only class
    label_alpha: float | None
    test_positives: int


def _hard_layout(
    sites: int, site_sizes: Sequence[int] | None, one_class_sites: int,
    label_alpha: float | None, test_prevalence: float | None, n_test: int,
) -> _Layout:
    """Check the hard-layout arguments (errors name the CLI flag) and resolve them."""
    sizes = None
    if site_sizes is not None:
        sizes = tuple(int(n) for n in site_sizes)
        if len(sizes) != sites:
            raise ValueError(
                f"--site-sizes gives {len(sizes)} sizes but --sites is {sites}; give one size "
                "per site (e.g. --site-sizes 30,80,600,1500 for 4 sites)"
            )
        small = [n for n in sizes if n < MIN_IMAGES]
        if small:
            raise ValueError(
                f"--site-sizes must all be >= {MIN_IMAGES} (a site needs train, val and test "
                f"images), got {small[0]}"
            )
    if not 0 <= one_class_sites <= sites:
        raise ValueError(
            f"--one-class-sites must be between 0 and --sites ({sites}), got {one_class_sites}"
        )
    if one_class_sites == sites == 1:
        raise ValueError(
            "--one-class-sites 1 with --sites 1 leaves the federation one class; use --sites >= 2"
        )
    if label_alpha is not None and not (math.isfinite(label_alpha) and label_alpha > 0):
        raise ValueError(
            f"--label-alpha must be > 0 (small: more skew, e.g. 0.5), got {label_alpha:g}"
        )
    n_pos = n_test // 2
    if test_prevalence is not None:
        if not 0 < test_prevalence < 1:
            raise ValueError(
                f"--test-prevalence must be in (0, 1) (the test set needs both classes), got "
                f"{test_prevalence:g}"
            )
        # both classes in the test set, or its AUC is undefined
        n_pos = min(n_test - 1, max(1, round(test_prevalence * n_test)))
    one_class: list[int | None] = [None] * (sites - one_class_sites)
    one_class += [k % 2 for k in range(one_class_sites)]  # normal, lesion, normal, ...
    return _Layout(sizes, tuple(one_class), label_alpha, n_pos)


# what synthesize writes in `out`: --force deletes only these, and only when medfed wrote them
SYNTH_OUTPUTS = ("sites", "test", "identifiers.json", INFO_FILE)


def _prepare(out: Path, overwrite: bool) -> None:
    prepare(
        out, force=overwrite, writes=SYNTH_OUTPUTS,
        exists_hint="pass --force to replace its synthetic data, or choose an empty folder",
        # synthetic data written before manifests: identifiers.json beside sites/ and test/
        legacy=lambda folder: (folder / "identifiers.json").is_file(),
    )
    note(out, *SYNTH_OUTPUTS)


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


def _stratified_splits(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Assign train/val/test ~ 70/15/15 within each class, so val and test hold both."""
    splits = [""] * len(labels)
    for cls in (False, True):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train = round(SITE_SPLITS[0][1] * idx.size)
        n_val = round(SITE_SPLITS[1][1] * idx.size)
        for k, i in enumerate(idx):
            splits[i] = "train" if k < n_train else "val" if k < n_train + n_val else "test"
    return splits


def _write_folder(
    folder: Path, jobs: list[tuple[SiteProfile, int, str]], seed: int, labelled_fraction: float,
    site_index: int, style: _Style | None = None,
) -> dict[str, list[str]]:
    """Write images, masks and labels.csv for one folder; return its fake identifiers."""
    style = style or _Style()
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    ids: dict[str, list[str]] = {"patient_names": [], "patient_ids": [], "accession_numbers": []}
    rows = []
    for n, (profile, label, split) in enumerate(jobs, start=1):
        rng = _rng(seed, 4, site_index, n)
        write = _write_volume if style.dims == 3 else _write_image
        ds, image_path, mask_path = write(
            folder, profile, bool(label), rng, (seed, site_index, n), style
        )
        # a separate stream, so the images are the same whatever the labelled fraction
        blank = split == "train" and _rng(seed, 5, site_index, n).random() >= labelled_fraction
        written = "" if blank else label
        rows.append((image_path, written, mask_path, split))
        ids["patient_names"].append(str(ds.PatientName))
        ids["patient_ids"].append(ds.PatientID)
        ids["accession_numbers"].append(ds.AccessionNumber)
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "label", "mask", "split"))
        writer.writerows(rows)
    return ids


_Case = tuple[int, int, int]  # (seed, site index, image number): what a file's UIDs derive from


def _write_image(
    folder: Path, profile: SiteProfile, lesion: bool, rng: np.random.Generator, case: _Case,
    style: _Style,
) -> tuple[Dataset, str, str]:
    """Write one 2D image and its mask; return its header and both paths in labels.csv."""
    stem = f"img_{case[2]:04d}"
    scanner = profile.scanner
    min_radius = min_lesion_radius(scanner.grid)
    if style.anatomical:
        assert profile.organs is not None  # set by _site_profiles for anatomical styles
        image, labels = anatomical_image(scanner, profile.organs, rng, lesion=lesion,
                                         min_radius=min_radius)
        mask = labels if style.masks == "anatomy" else labels == LESION
    else:
        phantom = sample_phantom(rng, scanner.view, lesion=lesion, min_radius=min_radius)
        image, mask = acquire(phantom, scanner, rng)
    ds = _dataset(profile, _encode(profile, image), rng, *case)
    ds.save_as(folder / "images" / f"{stem}.dcm", enforce_file_format=True)
    nib.save(_mask_nifti(mask, ds), folder / "masks" / f"{stem}.nii.gz")
    return ds, f"images/{stem}.dcm", f"masks/{stem}.nii.gz"


def _write_volume(
    folder: Path, profile: SiteProfile, lesion: bool, rng: np.random.Generator, case: _Case,
    style: _Style,
) -> tuple[Dataset, str, str]:
    """Write one volume as a DICOM series folder and its 3D mask.

    Returns the series' header (without pixels) and both paths in labels.csv.
    """
    stem = f"vol_{case[2]:04d}"
    scanner = profile.scanner
    assert profile.organs is not None and profile.protocol is not None  # set for --dims 3
    image, labels, levels = anatomical_volume(
        scanner, profile.organs, profile.protocol, rng, lesion=lesion,
        min_radius=min_lesion_radius(scanner.grid),
    )
    mask = labels if style.masks == "anatomy" else (labels == LESION).astype(np.uint8)
    stored = _encode(profile, image)
    template = _dataset(profile, stored[0], rng, *case, store=False)
    mask_nifti = series.mask_volume(mask, template, profile.protocol.thickness)
    seed, site_index, n = case
    series.write_series(
        folder / "images" / stem, template, stored, levels - levels[0],
        profile.protocol.thickness,
        store=lambda ds, pixels: set_pixels(ds, profile, pixels),
        uid=lambda kind: _uid(seed, site_index, n, kind),
    )
    nib.save(mask_nifti, folder / "masks" / f"{stem}.nii.gz")
    return template, f"images/{stem}", f"masks/{stem}.nii.gz"


def _encode(profile: SiteProfile, image: np.ndarray) -> np.ndarray:
    """Physical values -> stored integers in the site's bit depth and photometric sense."""
    value = image.astype(np.float64)
    if profile.gamma != 1.0:
        value = np.clip(value, 0.0, None) ** profile.gamma
    stored = np.rint((value - profile.intercept) / profile.slope)
    bits = profile.bits_stored
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if profile.signed else (0, 2**bits - 1)
    stored = np.clip(stored, lo, hi)
    if profile.photometric == "MONOCHROME1":
        stored = hi - stored
    return stored.astype(np.int16 if profile.signed else np.uint16)


def _uid(seed: int, site_index: int, n: int, kind: str) -> UID:
    # Deterministic entropy: the same seed writes the same UIDs, different seeds never clash.
    return generate_uid(entropy_srcs=["medfed-synth", str(seed), str(site_index), str(n), kind])


def _dataset(
    profile: SiteProfile,
    pixels: np.ndarray,
    rng: np.random.Generator,
    seed: int,
    site_index: int,
    n: int,
    *,
    store: bool = True,
) -> Dataset:
    """The DICOM header of image ``n`` (and its ``pixels``, unless not ``store``)."""

    def uid(kind: str) -> UID:
        return _uid(seed, site_index, n, kind)

    scanner = profile.scanner
    sop_class = _SOP_CLASS[profile.modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid("instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")

    sex = "F" if rng.uniform() < 0.5 else "M"
    given = _GIVEN[sex][int(rng.integers(len(_GIVEN[sex])))]
    family = _FAMILY[int(rng.integers(len(_FAMILY)))]
    study_day = date(2019, 1, 1) + timedelta(days=int(rng.integers(6 * 365)))
    birth = study_day - timedelta(days=int(rng.integers(25 * 365, 85 * 365)))
    ds.PatientName = f"{family}^{given}"
    ds.PatientID = f"MF{site_index:02d}{n:05d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sex
    ds.PatientAge = f"{(study_day - birth).days // 365:03d}Y"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_day.strftime("%Y%m%d")
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = (
        f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    )
    ds.AccessionNumber = f"A{site_index:02d}{int(rng.integers(10**7, 10**8))}"
    ds.StudyID = str(n)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = profile.modality
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.model
    ds.InstitutionName = profile.institution
    ds.StationName = profile.station
    ds.BodyPartExamined = "CHEST"
    ds.StudyDescription = "CHEST"
    axial = scanner.view == "axial"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if axial else ["ORIGINAL", "PRIMARY"]

    rows, cols = pixels.shape
    spacing = [f"{s:.6g}" for s in scanner.grid.spacing]
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = spacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.BitsAllocated = 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = int(profile.signed)
    if scanner.view == "axial":
        ys, xs = scanner.grid.axes()
        z = round(float(rng.uniform(-220, -120)), 1)
        ds.FrameOfReferenceUID = uid("frame")
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [f"{xs[0]:.4f}", f"{ys[0]:.4f}", f"{z}"]
        ds.SliceLocation = z
        ds.SliceThickness = round(float(rng.choice([1.0, 1.25, 2.5, 5.0])), 2)
    else:
        ds.ImagerPixelSpacing = spacing
        ds.ViewPosition = "PA"
        ds.PatientOrientation = ["L", "F"]
    if profile.modality == "CT":
        ds.KVP = int(rng.choice([100, 120]))
        ds.ConvolutionKernel = "B30f" if scanner.blur_mm > 1.0 else "B60f"
        if profile.organs is not None and profile.organs.enhanced:
            ds.ContrastBolusAgent = "Iohexol 350 mg/ml"
    elif profile.modality == "MR":
        ds.MagneticFieldStrength = 3.0 if "Vida" in profile.model else 1.5
        ds.ScanningSequence = "GR" if scanner.tissues.fat > 0.9 else "SE"
    else:
        ds.KVP = int(rng.choice([110, 120, 125]))
        if profile.modality == "DX":
            ds.PresentationIntentType = "FOR PRESENTATION"
    if profile.rescale_tags:
        ds.RescaleIntercept = f"{profile.intercept:g}"
        ds.RescaleSlope = f"{profile.slope:g}"
        ds.RescaleType = "HU"
    if profile.window is not None:
        ds.WindowCenter, ds.WindowWidth = profile.window
    if store:
        set_pixels(ds, profile, pixels)
    return ds


def set_pixels(ds: Dataset, profile: SiteProfile, pixels: np.ndarray) -> None:
    """Store ``pixels`` (as `_encode` returns them) in ``ds`` in the site's transfer syntax."""
    if profile.transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.tobytes()
    else:
        ds.compress(profile.transfer_syntax, pixels, generate_instance_uid=False)


def _mask_nifti(mask: np.ndarray, ds: Dataset) -> nib.Nifti1Image:
    """Mask as a 2D NIfTI whose affine maps (row, col) to RAS mm, spacing = PixelSpacing."""
    dr, dc = (float(s) for s in ds.PixelSpacing)
    x0, y0, z0 = (float(v) for v in ds.get("ImagePositionPatient", [0.0, 0.0, 0.0]))
    # DICOM is LPS with rows along +y and columns along +x; NIfTI is RAS, so x and y flip sign.
    affine = np.array(
        [[0.0, -dc, 0.0, -x0], [-dr, 0.0, 0.0, -y0], [0.0, 0.0, 1.0, z0], [0.0, 0.0, 0.0, 1.0]]
    )
    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    img.header.set_xyzt_units("mm")
    return img
