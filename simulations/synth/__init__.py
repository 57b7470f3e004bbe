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

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.outputs import note, prepare
from simulations.synth.layout import MIN_IMAGES, _hard_layout, _stratified_splits
from simulations.synth.sites import SiteProfile, _rng, _site_labels, _site_profiles, _Style
from simulations.synth.writer import _write_folder

MASK_KINDS = ("lesion", "anatomy")
DIMS = (2, 3)


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`synthesize` wrote: site names, images and lesion fraction per site."""

    out: Path
    sites: list[str]
    images: dict[str, int]
    test_images: int
    positives: dict[str, float]
    test_positives: int = 0


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
