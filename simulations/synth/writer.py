"""Writing one synthetic folder: DICOM images or series, NIfTI masks and labels.csv."""

from __future__ import annotations

import csv
from datetime import date, timedelta
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from common.data.sop import new_instance
from simulations import series
from simulations.anatomy import LESION
from simulations.phantom import acquire, min_lesion_radius, sample_phantom
from simulations.scans import anatomical_image, anatomical_volume
from simulations.synth.sites import SiteProfile, _rng, _Style

_SOP_CLASS = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "CR": ComputedRadiographyImageStorage,
}


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
    ds = new_instance(sop_class, uid)

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
