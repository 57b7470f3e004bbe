"""What kind of DICOM object a file is, by its SOP Class UID: image or not, and its modality.

Archives mix images with objects that merely carry pixel data (RT Dose grids, Segmentations)
or none (SR reports, presentation states, key object selections). Training on an RT Dose grid
as if it were a CT slice would be silent garbage, so objects are sorted by their SOP class,
named as pydicom's UID dictionary names them.
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from common.data.errors import ImageError

SEGMENTATION = "Segmentation Storage"
# Storage classes whose names lack "Image Storage" but that do hold an image grid.
_IMAGE_LIKE = ("Volume Storage", "Map Storage")  # Enhanced US Volume; Parametric, thickness maps
# Modality implied by an image storage class, for files whose Modality (0008,0060) is empty.
_MODALITY_BY_NAME = (
    ("CT Image", "CT"),
    ("MR Image", "MR"),
    ("Computed Radiography", "CR"),
    ("Digital X-Ray", "DX"),
    ("Digital Mammography", "MG"),
    ("Ultrasound", "US"),
    ("US Volume", "US"),
    ("Positron Emission", "PT"),
    ("PET Image", "PT"),
    ("Nuclear Medicine", "NM"),
)
OTHER_MODALITY = "OT"  # DICOM's own code for "other"


def sop_class_name(ds: Dataset) -> str | None:
    """Return the SOP class's registered name, or None when absent, private or unknown."""
    meta = getattr(ds, "file_meta", None)
    value = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    if not value:
        return None
    uid = UID(str(value).strip())
    name = uid.name
    return name if name != str(uid) else None


def is_image_class(name: str) -> bool:
    """True for storage classes that hold an image (CT, MR, Secondary Capture, ...)."""
    return "Image Storage" in name or name.endswith(_IMAGE_LIKE)


def refuse_non_image(ds: Dataset, *, as_labels: bool) -> None:
    """Raise ImageError naming the SOP class when the object is not an image (or label map)."""
    name = sop_class_name(ds)
    if name is None or is_image_class(name):
        return  # unknown and private classes are judged by their pixel data instead
    if as_labels and name == SEGMENTATION:
        raise ImageError(
            f"{SEGMENTATION}: a DICOM SEG stores one binary frame per segment and slice, which "
            "medfed does not map onto the image grid; convert it to a label map on the image's "
            "grid (NIfTI, or a grey DICOM with one integer label per pixel)"
        )
    raise ImageError(f"{name}: not an image for training; remove it from labels.csv")


def modality(ds: Dataset) -> str:
    """Return Modality (0008,0060), else the one the SOP class implies, else "OT"."""
    try:
        stated = str(ds.get("Modality", "") or "").strip().upper()
    except Exception:  # an unreadable Modality (unknown VR, wrong length) is as good as none
        stated = ""
    if stated:
        return stated
    name = sop_class_name(ds) or ""
    for fragment, code in _MODALITY_BY_NAME:
        if fragment in name:
            return code
    return OTHER_MODALITY


def new_instance(sop_class: str, uid: Callable[[str], UID]) -> Dataset:
    """An empty instance of `sop_class` in Explicit VR Little Endian, its UIDs drawn from `uid`.

    `uid(kind)` gives the instance, study and series UIDs ("instance", "study", "series"), so a
    writer that derives them from a seed writes the same files every time.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = uid("instance")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    return ds
