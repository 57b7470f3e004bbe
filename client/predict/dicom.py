"""DICOM objects that `medfed predict` writes: a SEG per series, a Secondary Capture per image.

A radiologist looks at a prediction in the viewer they already use, so predict writes what a
PACS stores beside the study:

- `write_seg`: a DICOM Segmentation (BINARY, one segment per class of the model, coded in
  SNOMED CT where the class name is known) derived from one source series. Its frames point at
  the source instances (and frames), so a viewer lays it over the images it came from.
- `write_secondary_capture`: a Secondary Capture of one source image with the saliency map
  overlaid (`overlay` draws it), the score and decision in its series description.

Both are marked DERIVED, carry the source's patient and study (the Study Instance UID is the
source's, the series and instance UIDs are new) and reference the source's instance UIDs. The
patient module is what the standard requires for an object of the study; these files stay at
the site, in predict's output folder, and nothing here sends anything anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

MANUFACTURER = "medfed"
_LO_MAX = 64  # characters of a LO value (SeriesDescription, ContentDescription)
# Patient and study attributes that highdicom reads from a source. All are type 2 (present,
# may be empty): an anonymised export often drops them, and empty is what the standard asks.
_TYPE2_FROM_SOURCE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "ReferringPhysicianName",
)
# What a SEG of positioned single-frame images copies for each frame (the Pixel Measures,
# Plane Position and Plane Orientation functional groups).
_PLACED_BY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")

# Segment codes: (category, type, type modifier) from CID 7150/7151 (and CID 244 laterality).
_ORGAN, _ABNORMAL, _BODY_PART = (
    codes.SCT.Organ, codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.AnatomicalStructure,
)
_KNOWN: dict[str, tuple[Code, Code, Code | None]] = {
    "lung": (_ORGAN, codes.SCT.Lung, None),
    "lungs": (_ORGAN, codes.SCT.Lung, None),
    "right lung": (_ORGAN, codes.SCT.Lung, codes.SCT.Right),
    "left lung": (_ORGAN, codes.SCT.Lung, codes.SCT.Left),
    "heart": (_ORGAN, codes.SCT.Heart, None),
    "liver": (_ORGAN, codes.SCT.Liver, None),
    "lesion": (_ABNORMAL, codes.SCT.Lesion, None),
    "nodule": (_ABNORMAL, codes.SCT.Nodule, None),
    "lung nodule": (_ABNORMAL, codes.SCT.Nodule, None),
    "mass": (_ABNORMAL, codes.SCT.Mass, None),
    "body": (_BODY_PART, codes.SCT.EntireBody, None),
}
# A class medfed cannot name in SNOMED CT still becomes a segment, labelled with its name.
_GENERIC = (codes.SCT.Tissue, codes.SCT.Tissue, None)


def segment_codes(name: str) -> tuple[Code, Code, Code | None]:
    """(category, type, type modifier or None) of a class name; Tissue for names not known."""
    return _KNOWN.get(" ".join(name.lower().replace("_", " ").split()), _GENERIC)


def write_seg(
    sources: Sequence[Dataset],
    labels: np.ndarray,
    classes: Mapping[int, str],
    out_dir: Path,
    *,
    series_number: int = 900,
    description: str = "medfed segmentation",
    model: str = "medfed",
    version: str,
) -> Path:
    """Write the predicted label map of one source series as a DICOM SEG; return its path.

    Args:
        sources: the instances of one series in the order of ``labels``' slices: N
            single-frame instances for labels (N, Rows, Columns), or one multi-frame
            instance for labels (NumberOfFrames, Rows, Columns). Headers are enough.
        labels: class index per pixel (0 background) on the sources' own grid.
        classes: label -> name of every foreground class of the model, labels 1..K. Each
            becomes segment ``label`` (so a reader maps segment numbers back to labels), also
            when this series holds none of it: an empty segment says "none found".
        model, version: the algorithm's name and version, recorded in each segment.

    The file is ``out_dir/seg-<source Series Instance UID>.dcm``, or for one source instance
    ``seg-<its SOP Instance UID>.dcm`` (a series written instance by instance stays unique).

    Raises:
        ValueError: the sources or labels cannot make a valid SEG (mixed series or sizes,
            a CT/MR without a frame of reference or position, several instances without
            any position, labels off the grid or outside ``classes``); the message names
            the series and a source file.

    """
    if not sources:
        raise ValueError("write_seg needs at least one source instance, got none")
    where = _series_name(sources)
    headers = [_header(ds) for ds in sources]
    _check_series(headers, where)
    planes = _check_labels(labels, headers, classes, where)
    _check_geometry(headers, where)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model[:_LO_MAX], family=codes.cid7162.ArtificialIntelligence,
        version=version[:_LO_MAX],
    )
    segments = [_segment(number, classes[number], algorithm) for number in sorted(classes)]
    try:
        seg = hd.seg.Segmentation(
            source_images=headers,
            pixel_array=planes,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=model[:_LO_MAX],
            software_versions=_software_version(),
            device_serial_number=model[:_LO_MAX],
            content_description=description[:_LO_MAX],
            series_description=description[:_LO_MAX],
            # Empty frames are left out (a 300-slice CT keeps only the slices with findings);
            # a prediction with no foreground at all keeps every frame, empty, so the SEG
            # still exists and says "none found" (highdicom cannot omit every frame).
            omit_empty_frames=bool(planes.any()),
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"{where}: cannot derive a DICOM SEG from it: {e}") from e
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" not in shared:
        # Unpositioned (a radiograph): the General Image module then requires (type 2C) the
        # patient orientation of rows and columns; highdicom leaves it out.
        seg.PatientOrientation = headers[0].get("PatientOrientation", "")
        measures = shared.get("PixelMeasuresSequence")
        if measures and "SliceThickness" not in measures[0]:
            # highdicom 0.28.2 copies a radiograph's PixelSpacing alone into Pixel Measures,
            # and then refuses to read its own SEG back (PixelMeasuresSequence.from_sequence
            # wants SliceThickness too). The macro is optional without a frame of reference
            # and the SEG lies pixel for pixel on its source, which keeps the spacing.
            del shared.PixelMeasuresSequence
    out_dir.mkdir(parents=True, exist_ok=True)
    uid = headers[0].SOPInstanceUID if len(headers) == 1 else headers[0].SeriesInstanceUID
    path = out_dir / f"seg-{uid}.dcm"
    seg.save_as(path, enforce_file_format=True)
    return path


def _segment(
    number: int, name: str, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    category, kind, modifier = segment_codes(name)
    segment = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=name[:_LO_MAX],
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    if modifier is not None:  # laterality (CID 244) qualifies the type, as dcmqi writes it
        segment.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(
            modifier
        )]
    return segment


def _series_name(sources: Sequence[Dataset]) -> str:
    first = sources[0]
    series = first.get("SeriesInstanceUID", "without a Series Instance UID")
    files = [_file(ds) for ds in sources[:2] if _filename(ds)]
    shown = ", ".join(files) + (" ..." if len(sources) > 2 and files else "")
    return f"series {series}" + (f" ({shown})" if shown else "")


def _header(ds: Dataset) -> Dataset:
    """The source's attributes without its pixels, missing type 2 patient/study ones empty."""
    header = Dataset()
    header.update({tag: ds[tag] for tag in ds.keys() if tag.group != 0x7FE0})
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in header:
            setattr(header, keyword, "")
    if header.PatientSex not in ("M", "F", "O", ""):
        # archives hold "U" and the like; highdicom takes only the enumerated values, and an
        # empty value is the standard's "unknown"
        header.PatientSex = ""
    if _filename(ds):
        header.filename = _filename(ds)
    return header


def _check_series(headers: Sequence[Dataset], where: str) -> None:
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                    "Rows", "Columns"):
        for ds in headers:
            if not ds.get(keyword):
                raise ValueError(f"{where}: {_file(ds)} has no {keyword}; a SEG references "
                                 "its source by it, so this series cannot get one")
    first = headers[0]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns",
                    "FrameOfReferenceUID"):
        for ds in headers[1:]:
            if ds.get(keyword) != first.get(keyword):
                raise ValueError(
                    f"{where}: {_file(ds)} has {keyword} {ds.get(keyword)}, {_file(first)} "
                    f"{first.get(keyword)}; one SEG covers instances of one series on one grid, "
                    "so pass these instances separately"
                )
    if len(headers) > 1 and any("NumberOfFrames" in ds for ds in headers):
        raise ValueError(f"{where}: several instances and at least one is multi-frame; pass a "
                         "multi-frame instance alone")


def _check_labels(
    labels: np.ndarray, headers: Sequence[Dataset], classes: Mapping[int, str], where: str
) -> np.ndarray:
    numbers = sorted(classes)
    if not numbers or numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"classes must name the foreground classes 1..K (0 is background), "
                         f"got {numbers}")
    frames = len(headers) if len(headers) > 1 else int(headers[0].get("NumberOfFrames") or 1)
    shape = (frames, int(headers[0].Rows), int(headers[0].Columns))
    if not isinstance(labels, np.ndarray) or labels.shape != shape:
        got = labels.shape if isinstance(labels, np.ndarray) else type(labels).__name__
        raise ValueError(f"{where}: labels must have shape {shape} (slices, Rows, Columns of "
                         f"the sources), got {got}; resample the prediction to the source grid")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(f"{where}: labels must be integer class indices, got {labels.dtype}")
    found = np.unique(labels)
    unknown = sorted(set(found.tolist()) - {0, *numbers})
    if unknown:
        raise ValueError(f"{where}: labels hold {unknown}, not among the classes {numbers} "
                         "(or 0, background)")
    return labels.astype(np.uint8 if numbers[-1] <= np.iinfo(np.uint8).max else np.uint16)


def _check_geometry(headers: Sequence[Dataset], where: str) -> None:
    """Refuse, with the reason, what highdicom cannot place; let it place everything else."""
    first = headers[0]
    positioned = "ImagePositionPatient" in first or any(
        "PlanePositionSequence" in (group or [Dataset()])[0]
        for group in (first.get("SharedFunctionalGroupsSequence"),
                      first.get("PerFrameFunctionalGroupsSequence"))
    )
    if "FrameOfReferenceUID" not in first:
        # highdicom refuses this for SOP classes that require a frame of reference (CT, MR);
        # a projection radiograph has none and is segmented as one unpositioned image.
        positioned = False
    if positioned:
        # An enhanced (multi-frame) instance keeps these in its functional groups, where
        # highdicom looks them up itself.
        for ds in (ds for ds in headers if "SharedFunctionalGroupsSequence" not in ds):
            for keyword in _PLACED_BY:
                if ds.get(keyword) in (None, ""):
                    raise ValueError(
                        f"{where}: {_file(ds)} has no {keyword}; a SEG of a positioned image "
                        f"(one with a frame of reference) places its frames by "
                        f"{', '.join(_PLACED_BY)}"
                    )
    else:
        frames = len(headers) if len(headers) > 1 else int(first.get("NumberOfFrames") or 1)
        if frames > 1:
            raise ValueError(
                f"{where}: {frames} images without a patient position (no "
                "FrameOfReferenceUID/ImagePositionPatient): a SEG of unpositioned images "
                "covers one image; pass each instance alone"
            )


def _filename(ds: Dataset) -> str | None:
    name = getattr(ds, "filename", None)  # a path for a file read from disk, else None/buffer
    return str(name) if isinstance(name, str | Path) and str(name) else None


def _file(ds: Dataset) -> str:
    name = _filename(ds)
    return Path(name).name if name else f"instance {ds.get('SOPInstanceUID', '?')}"


def _software_version() -> str:
    try:
        return f"medfed {package_version('medfed')}"
    except PackageNotFoundError:  # run from a checkout without installing it
        return "medfed"


def write_secondary_capture(
    source: Dataset,
    rgb: np.ndarray,
    out_dir: Path,
    *,
    description: str,
    series_uid: str | None = None,
    series_number: int = 901,
    instance_number: int = 1,
) -> Path:
    """Write ``rgb`` as a Secondary Capture derived from ``source``; return its path.

    Args:
        source: the image the picture shows (header enough); its patient and study are copied
            and its instance is referenced as the source image.
        rgb: uint8 (rows, columns, 3), e.g. `overlay` of the image and its saliency map.
        description: the series description a PACS lists (score and decision), cut to 64
            characters.
        series_uid: the Series Instance UID shared by the pictures of one predict call; a new
            one when None.

    The file is ``out_dir/sc-<source SOP Instance UID>.dcm``.

    Raises:
        ValueError: ``rgb`` is not uint8 (rows, columns, 3), or the source lacks the UIDs a
            reference needs; the message names the source file.

    """
    where = _file(source)
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 \
            or rgb.dtype != np.uint8:
        got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"{where}: the Secondary Capture needs a uint8 (rows, columns, 3) RGB "
                         f"picture, got {got}")
    header = _header(source)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"):
        if not header.get(keyword):
            raise ValueError(f"{where} has no {keyword}; a Secondary Capture references its "
                             "source by it")
    try:
        sc = _sc_image(header, rgb, series_uid, series_number, instance_number, description)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"{where}: cannot derive a Secondary Capture from it: {e}") from e
    row, column = _patient_orientation(header)
    sc.PatientOrientation = [row, column] if row and column else []
    if rgb.shape[:2] == (header.get("Rows"), header.get("Columns")) and header.get(
        "PixelSpacing"
    ):
        sc.PixelSpacing = header.PixelSpacing  # the picture lies on the source's grid
    sc.ImageType = ["DERIVED", "SECONDARY"]
    _copy_laterality(header, sc)
    sc.BurnedInAnnotation = "NO"  # colour only; the score lives in the series description
    sc.DerivationDescription = "source image with the model's saliency map overlaid"
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(
        codes.DCM.SourceImageForImageProcessingOperation
    )]
    sc.SourceImageSequence = [reference]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sc-{header.SOPInstanceUID}.dcm"
    sc.save_as(path, enforce_file_format=True)
    return path


def _sc_image(
    header: Dataset, rgb: np.ndarray, series_uid: str | None, series_number: int,
    instance_number: int, description: str,
) -> hd.sc.SCImage:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom takes one letter per axis and no "unknown"; the source's own (possibly
        # oblique, "LP") or an empty orientation replaces this below
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=description[:_LO_MAX],
        software_versions=_software_version(),
    )


def _copy_laterality(source: Dataset, sc: Dataset) -> None:
    """Body part and side as the source states them (General Series, Laterality type 2C).

    Laterality is required for a paired body part: the source's side (R or L); absent, as in
    the source, when the source names its body part without a side (dciodvfy knows which
    parts are paired); empty ("unknown") when the source says neither.
    """
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    side = source.get("Laterality") or source.get("ImageLaterality") or ""
    if side in ("R", "L"):
        sc.Laterality = side
    elif "Laterality" in source or "BodyPartExamined" not in source:
        sc.Laterality = ""


def _patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Patient directions of the rows and columns.

    The source's PatientOrientation, else letters from its direction cosines
    (ImageOrientationPatient), else unknown ("", "").
    """
    given = ds.get("PatientOrientation")
    if given and len(given) == 2:
        return str(given[0]), str(given[1])
    cosines = ds.get("ImageOrientationPatient")
    if not cosines or len(cosines) != 6:
        return "", ""
    row, col = np.array(cosines[:3], float), np.array(cosines[3:], float)
    return _direction(row), _direction(col)


def _direction(v: np.ndarray) -> str:
    # DICOM patient axes (LPS): +x left, +y posterior, +z head; letters by decreasing weight.
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    order = np.argsort(-np.abs(v))
    return "".join(letters[i][int(v[i] > 0)] for i in order if abs(v[i]) > 1e-3)


# A perceptual blue-cyan-yellow-red ramp (stops of matplotlib's "turbo" at 0, .25, .5, .75, 1),
# interpolated in numpy so the colours need no plotting library.
_TURBO_STOPS = np.array([
    [0.190, 0.072, 0.232],
    [0.158, 0.736, 0.923],
    [0.644, 0.990, 0.234],
    [0.984, 0.493, 0.128],
    [0.480, 0.016, 0.011],
])


def overlay(grey: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour-mapped ``heat`` over ``grey`` into uint8 (rows, columns, 3).

    Args:
        grey: the image, floats in [0, 1] (windowed as the reader sees it).
        heat: the saliency map on the same grid, floats in [0, 1].
        alpha: opacity of the colour where ``heat`` is 1; it falls with ``heat``, so the image
            shows unchanged where the map is 0.

    """
    if grey.shape != heat.shape or grey.ndim != 2:
        raise ValueError(f"overlay needs two 2D arrays of the same shape, got {grey.shape} "
                         f"and {heat.shape}")
    if not (np.isfinite(grey).all() and np.isfinite(heat).all()):
        raise ValueError("overlay: the image or the saliency map holds NaN or infinity")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    g = np.clip(grey, 0.0, 1.0)[..., None]
    h = np.clip(heat, 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(_TURBO_STOPS))
    colour = np.stack(
        [np.interp(h, positions, _TURBO_STOPS[:, c]) for c in range(3)], axis=-1
    )
    weight = alpha * h[..., None]
    blended = (1.0 - weight) * g + weight * colour
    return np.rint(blended * 255.0).astype(np.uint8)
