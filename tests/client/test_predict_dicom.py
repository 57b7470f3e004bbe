"""DICOM SEG and Secondary Capture writers of `medfed predict` on real files.

Sources are medfed's phantoms as `medfed synth` writes them (CT, MR, DX, CR, compressed and
not; a CT series), a multi-frame CT converted from that series by highdicom, and radiographs
built here with pydicom without any geometry. Every object written is read back and checked
with dicom3tools' dciodvfy.
"""

from __future__ import annotations

import copy
import csv
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from client.predict.dicom import overlay, segment_codes, write_secondary_capture, write_seg
from common.data.mask_formats import read_placed_mask
from simulations.anatomy import LABELS
from simulations.synth import synthesize

DCIODVFY = "/usr/bin/dciodvfy"
ANATOMY = {k: v for k, v in LABELS.items() if k}  # body, right lung, ... lesion: 1..6
needs_dciodvfy = pytest.mark.skipif(
    shutil.which(DCIODVFY) is None,
    reason=f"{DCIODVFY} absent: install Debian's dicom3tools to validate the objects written",
)


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dciodvfy starts with 'Error' for ``path`` (warnings are fine)."""
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


# --- sources -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 2D image per phantom archetype: CT, MR (RLE), DX (JPEG-LS), CT (J2K), CR (RLE)."""
    out = tmp_path_factory.mktemp("synth2d")
    synthesize(out, sites=5, images_per_site=10, test_images=10, seed=3)
    images = {}
    for site in sorted((out / "sites").iterdir()):
        first = sorted((site / "images").glob("*.dcm"))[0]
        images[f"{site.name}-{pydicom.dcmread(first, stop_before_pixels=True).Modality}"] = first
    return images


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dataset], np.ndarray]:
    """A phantom CT series (inferior slice first) and its anatomy label map (S, rows, cols)."""
    out = tmp_path_factory.mktemp("synth3d")
    synthesize(out, sites=1, images_per_site=10, test_images=10, seed=3, dims=3,
               masks="anatomy")
    site = out / "sites" / "hospital-01"
    with open(site / "labels.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["label"] == "1")  # one with a lesion
    slices = [pydicom.dcmread(p) for p in sorted((site / row["path"]).glob("*.dcm"))]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    # the NIfTI mask's voxel axes are (column, row, slice), inferior slice first
    mask = np.asarray(nib.load(site / row["mask"]).dataobj).transpose(2, 1, 0)
    return slices, mask.astype(np.uint8)


def radiograph(rows: int = 40, cols: int = 48, **attributes: object) -> Dataset:
    """A CR image as a bare modality writes it: no frame of reference, no position, no name."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientID = "CR0001"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(rows * cols, dtype=np.uint16).tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def lesion_labels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A label map with one square lesion somewhere in the middle slice."""
    labels = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(seed)
    r, c = (int(rng.integers(2, n // 2)) for n in shape[1:])
    labels[shape[0] // 2, r:r + shape[1] // 4, c:c + shape[2] // 4] = 1
    return labels


def read_labels(path: Path, sources: list[Dataset]) -> np.ndarray:
    """The SEG's label map on the sources' frames, as highdicom maps it back."""
    seg = hd.seg.segread(path)
    return seg.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in sources], combine_segments=True,
        assert_missing_frames_are_empty=True,
    )


def referenced_instances(path: Path) -> set[str]:
    return {str(uid) for _, _, uid in hd.seg.segread(path).get_source_image_uids()}


# --- SEG -----------------------------------------------------------------------------------


def test_seg_of_a_ct_series_round_trips_the_anatomy_labels(volume, tmp_path: Path) -> None:
    slices, labels = volume
    assert set(np.unique(labels)) == set(LABELS)  # all six classes and background are there
    path = write_seg(slices, labels, ANATOMY, tmp_path, model="unet-anatomy", version="r5")

    assert path == tmp_path / f"seg-{slices[0].SeriesInstanceUID}.dcm"
    assert np.array_equal(read_labels(path, slices), labels)
    assert referenced_instances(path) == {str(ds.SOPInstanceUID) for ds in slices}
    seg = pydicom.dcmread(path)
    assert seg.StudyInstanceUID == slices[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != slices[0].SeriesInstanceUID
    assert seg.SOPInstanceUID not in {ds.SOPInstanceUID for ds in slices}
    assert seg.FrameOfReferenceUID == slices[0].FrameOfReferenceUID
    assert (seg.PatientID, seg.PatientName) == (slices[0].PatientID, slices[0].PatientName)
    assert seg.SegmentationType == "BINARY"
    assert "DERIVED" in seg.ImageType
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == list(
        ANATOMY.items()
    )
    for segment in seg.SegmentSequence:
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("unet-anatomy", "r5")
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"


def test_known_class_names_get_snomed_codes_and_laterality(volume, tmp_path: Path) -> None:
    slices, labels = volume
    seg = pydicom.dcmread(write_seg(slices, labels, ANATOMY, tmp_path, version="r5"))
    coded = {
        s.SegmentLabel: (
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue
            if "SegmentedPropertyTypeModifierCodeSequence" in s else None,
        )
        for s in seg.SegmentSequence
    }
    assert coded == {
        "body": ("91723000", "38266002", None),        # anatomical structure: entire body
        "right lung": ("91772007", "39607008", "24028007"),  # organ: lung, right
        "left lung": ("91772007", "39607008", "7771000"),    # organ: lung, left
        "heart": ("91772007", "80891009", None),
        "liver": ("91772007", "10200004", None),
        "lesion": ("49755003", "52988006", None),      # morphologically abnormal: lesion
    }
    assert segment_codes("Class 3")[1].meaning == "Tissue"  # unknown names stay segments


def test_every_class_is_a_segment_also_when_absent(volume, tmp_path: Path) -> None:
    slices, labels = volume
    no_lesion = np.where(labels == 6, 1, labels).astype(np.uint8)
    path = write_seg(slices, no_lesion, ANATOMY, tmp_path, version="r5")
    seg = hd.seg.segread(path)
    assert seg.get_segment_numbers() == [1, 2, 3, 4, 5, 6]
    assert np.array_equal(read_labels(path, slices), no_lesion)
    assert not seg.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in slices], segment_numbers=[6],
        assert_missing_frames_are_empty=True,
    ).any()


def test_an_empty_prediction_is_still_a_seg(volume, tmp_path: Path) -> None:
    slices, labels = volume
    empty = np.zeros_like(labels)
    path = write_seg(slices, empty, {1: "lesion"}, tmp_path, version="r5")
    assert np.array_equal(read_labels(path, slices), empty)
    assert referenced_instances(path) == {str(ds.SOPInstanceUID) for ds in slices}
    assert int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames) == len(slices)


def test_a_seg_that_omits_empty_slices_keeps_only_those_with_findings(volume,
                                                                      tmp_path: Path) -> None:
    slices, _ = volume
    labels = lesion_labels((len(slices), slices[0].Rows, slices[0].Columns))
    path = write_seg(slices, labels, {1: "lesion"}, tmp_path, version="r5")
    assert int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames) == 1
    assert np.array_equal(read_labels(path, slices), labels)
    assert referenced_instances(path) == {str(ds.SOPInstanceUID) for ds in slices}


def test_medfed_reads_its_own_seg_back_as_a_mask(volume, tmp_path: Path) -> None:
    slices, labels = volume
    series = tmp_path / "series"
    series.mkdir()
    for k, ds in enumerate(slices):
        ds.save_as(series / f"{k:03d}.dcm", enforce_file_format=True)
    path = write_seg(slices, labels, ANATOMY, tmp_path / "out", version="r5")
    raw, _ = read_placed_mask(path, image=series)
    assert np.array_equal(raw.pixels[..., 0], labels)  # medfed stacks inferior first too


def test_seg_of_a_multiframe_instance(volume, tmp_path: Path) -> None:
    slices, labels = volume
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        slices, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    frames = int(enhanced.NumberOfFrames)
    # the converter orders the frames itself; each names the slice it was made from
    index = {ds.SOPInstanceUID: k for k, ds in enumerate(slices)}
    order = [index[item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID]
             for item in enhanced.PerFrameFunctionalGroupsSequence]
    frame_labels = labels[order]
    assert frame_labels.shape[0] == frames
    path = write_seg([enhanced], frame_labels, ANATOMY, tmp_path, version="r5")

    assert path.name == f"seg-{enhanced.SOPInstanceUID}.dcm"
    back = hd.seg.segread(path).get_pixels_by_source_frame(
        str(enhanced.SOPInstanceUID), source_frame_numbers=list(range(1, frames + 1)),
        combine_segments=True, assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(back, frame_labels)
    assert referenced_instances(path) == {str(enhanced.SOPInstanceUID)}
    if shutil.which(DCIODVFY):
        assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("kind", ["hospital-01-CT", "hospital-02-MR", "hospital-03-DX",
                                  "hospital-04-CT", "hospital-05-CR"])
def test_seg_of_one_phantom_image_of_every_archetype(phantoms, kind: str,
                                                     tmp_path: Path) -> None:
    source = pydicom.dcmread(phantoms[kind])
    labels = lesion_labels((1, source.Rows, source.Columns))
    path = write_seg([source], labels, {1: "lesion"}, tmp_path, version="r1")
    assert path.name == f"seg-{source.SOPInstanceUID}.dcm"
    assert np.array_equal(read_labels(path, [source]), labels)
    assert referenced_instances(path) == {source.SOPInstanceUID}
    seg = pydicom.dcmread(path)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    if "FrameOfReferenceUID" not in source:  # a radiograph: rows and columns are oriented
        assert seg.PatientOrientation == source.PatientOrientation
    if shutil.which(DCIODVFY):
        assert dciodvfy_errors(path) == []


def test_seg_of_a_radiograph_without_geometry_or_patient_details(tmp_path: Path) -> None:
    source = radiograph()  # no PixelSpacing, position, frame of reference, name, dates
    labels = lesion_labels((1, 40, 48))
    path = write_seg([source], labels, {1: "nodule"}, tmp_path, version="r1")
    assert np.array_equal(read_labels(path, [source]), labels)
    seg = pydicom.dcmread(path)
    assert seg.PatientID == "CR0001" and seg.PatientName == ""
    assert "FrameOfReferenceUID" not in seg
    if shutil.which(DCIODVFY):
        assert dciodvfy_errors(path) == []


def test_a_sex_outside_the_standard_values_is_written_as_unknown(tmp_path: Path) -> None:
    source = radiograph(PatientSex="U")  # seen in archives; DICOM enumerates M, F, O
    seg = write_seg([source], np.zeros((1, 40, 48), np.uint8), {1: "lesion"}, tmp_path,
                    version="r1")
    sc = write_secondary_capture(source, picture(source), tmp_path, description="x")
    assert pydicom.dcmread(seg).PatientSex == pydicom.dcmread(sc).PatientSex == ""


def test_labels_above_255_are_not_wrapped(tmp_path: Path) -> None:
    source = radiograph()
    labels = np.zeros((1, 40, 48), np.uint16)
    labels[0, :10, :10] = 300
    labels[0, 20:, 20:] = 44  # 300 would read as 44 in uint8
    path = write_seg([source], labels, {k: f"class {k}" for k in range(1, 301)}, tmp_path,
                     version="r1")
    assert np.array_equal(read_labels(path, [source]), labels)


@needs_dciodvfy
def test_series_segs_pass_dciodvfy(volume, tmp_path: Path) -> None:
    slices, labels = volume
    written = [
        write_seg(slices, labels, ANATOMY, tmp_path / "anatomy", version="r5"),
        write_seg(slices, np.zeros_like(labels), {1: "lesion"}, tmp_path / "empty",
                  version="r5"),
        write_seg(slices, (labels == 6).astype(np.uint8), {1: "lesion"}, tmp_path / "lesion",
                  version="r5"),
    ]
    for path in written:
        assert dciodvfy_errors(path) == [], path.parent.name


# --- SEG: what cannot be written says why ----------------------------------------------------


def test_several_radiographs_of_one_series_are_refused_with_the_fix() -> None:
    series = generate_uid()
    study = generate_uid()
    views = [radiograph(SeriesInstanceUID=series, StudyInstanceUID=study) for _ in range(2)]
    with pytest.raises(ValueError, match=f"series {series}.*pass each instance alone"):
        write_seg(views, np.zeros((2, 40, 48), np.uint8), {1: "lesion"}, Path("unused"),
                  version="r1")


def test_a_ct_without_frame_of_reference_is_refused(volume, tmp_path: Path) -> None:
    slices, labels = volume
    broken = copy.deepcopy(slices[0])
    del broken.FrameOfReferenceUID
    broken.filename = "slice_009.dcm"
    with pytest.raises(ValueError, match="slice_009.dcm.*Frame ?Of ?Reference"):
        write_seg([broken], np.zeros_like(labels[:1]), {1: "lesion"}, tmp_path, version="r1")


@pytest.mark.parametrize("keyword", ["PixelSpacing", "SliceThickness", "ImageOrientationPatient"])
def test_a_positioned_slice_without_its_geometry_is_refused(volume, keyword: str) -> None:
    slices, labels = volume
    broken = copy.deepcopy(slices[2])
    delattr(broken, keyword)
    broken.filename = "slice_bad.dcm"
    with pytest.raises(ValueError, match=f"slice_bad.dcm has no {keyword}"):
        write_seg([*slices[:2], broken], np.zeros_like(labels[:3]), {1: "lesion"},
                  Path("unused"), version="r1")


def test_slices_of_different_sizes_are_refused(volume) -> None:
    slices, labels = volume
    odd = copy.deepcopy(slices[1])
    odd.Rows = int(odd.Rows) + 1
    odd.filename = "slice_odd.dcm"
    with pytest.raises(ValueError, match="slice_odd.dcm has Rows"):
        write_seg([slices[0], odd], labels[:2], {1: "lesion"}, Path("unused"), version="r1")


@pytest.mark.parametrize(("labels", "classes", "message"), [
    (np.zeros((1, 40, 40), np.uint8), {1: "lesion"}, r"shape \(1, 40, 48\)"),
    (np.zeros((40, 48), np.uint8), {1: "lesion"}, r"shape \(1, 40, 48\)"),
    (np.full((1, 40, 48), 3, np.uint8), {1: "lesion"}, r"labels hold \[3\]"),
    (np.zeros((1, 40, 48), np.float32), {1: "lesion"}, "integer class indices"),
    (np.zeros((1, 40, 48), np.uint8), {1: "body", 3: "lesion"}, r"1..K"),
    (np.zeros((1, 40, 48), np.uint8), {}, r"1..K"),
])
def test_labels_that_do_not_fit_are_refused(labels, classes, message) -> None:
    with pytest.raises(ValueError, match=message):
        write_seg([radiograph()], labels, classes, Path("unused"), version="r1")


# --- Secondary Capture ---------------------------------------------------------------------


def picture(ds: Dataset) -> np.ndarray:
    grey = ds.pixel_array.astype(np.float64)
    grey = (grey - grey.min()) / max(float(np.ptp(grey)), 1e-9)
    rows, cols = grey.shape
    yy, xx = np.mgrid[:rows, :cols]
    heat = np.exp(-((yy - rows / 3) ** 2 + (xx - cols / 2) ** 2) / (2 * (rows / 8) ** 2))
    return overlay(grey, heat)


@pytest.mark.parametrize("kind", ["hospital-01-CT", "hospital-03-DX", "hospital-05-CR"])
def test_secondary_capture_is_derived_in_the_source_study(phantoms, kind: str,
                                                          tmp_path: Path) -> None:
    source = pydicom.dcmread(phantoms[kind])
    rgb = picture(source)
    description = "medfed lesion 0.91 positive " + "x" * 80
    path = write_secondary_capture(source, rgb, tmp_path, description=description)

    assert path == tmp_path / f"sc-{source.SOPInstanceUID}.dcm"
    sc = pydicom.dcmread(path)
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SOPInstanceUID != source.SOPInstanceUID
    assert "DERIVED" in sc.ImageType
    assert sc.SeriesDescription == description[:64]
    assert (sc.PatientID, sc.PatientName) == (source.PatientID, source.PatientName)
    reference = sc.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert sc.PhotometricInterpretation == "RGB"
    assert np.array_equal(sc.pixel_array, rgb)
    if shutil.which(DCIODVFY):
        assert dciodvfy_errors(path) == []


@pytest.mark.parametrize(("cosines", "expected"), [
    ([1, 0, 0, 0, 1, 0], ["L", "P"]),                  # axial, as the phantoms are
    ([0.8660254, 0.5, 0, -0.5, 0.8660254, 0], ["LP", "PR"]),  # rotated 30 degrees in plane
    ([0, 1, 0, 0, 0, -1], ["P", "F"]),                 # sagittal
])
def test_secondary_capture_states_the_rows_and_columns_directions(
    phantoms, cosines: list[float], expected: list[str], tmp_path: Path
) -> None:
    source = pydicom.dcmread(phantoms["hospital-01-CT"])
    source.ImageOrientationPatient = cosines
    path = write_secondary_capture(source, picture(source), tmp_path, description="x")
    assert pydicom.dcmread(path).PatientOrientation == expected
    if shutil.which(DCIODVFY):
        assert dciodvfy_errors(path) == []


def test_secondary_captures_of_one_call_share_a_series(phantoms, tmp_path: Path) -> None:
    series = hd.UID()
    paths = [
        write_secondary_capture(pydicom.dcmread(phantoms[kind]),
                                picture(pydicom.dcmread(phantoms[kind])), tmp_path,
                                description="medfed lesion", series_uid=series,
                                instance_number=n)
        for n, kind in enumerate(["hospital-01-CT", "hospital-04-CT"], start=1)
    ]
    read = [pydicom.dcmread(p) for p in paths]
    assert {ds.SeriesInstanceUID for ds in read} == {series}
    assert [ds.InstanceNumber for ds in read] == [1, 2]
    assert read[0].SOPInstanceUID != read[1].SOPInstanceUID


def test_secondary_capture_of_a_bare_radiograph(tmp_path: Path) -> None:
    source = radiograph()
    rgb = picture(source)
    path = write_secondary_capture(source, rgb, tmp_path, description="medfed lesion 0.12 "
                                   "negative")
    sc = pydicom.dcmread(path)
    assert np.array_equal(sc.pixel_array, rgb)
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientOrientation == ""  # the source says nothing about it
    if shutil.which(DCIODVFY):
        assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("rgb", [
    np.zeros((40, 48), np.uint8), np.zeros((40, 48, 4), np.uint8),
    np.zeros((40, 48, 3), np.float32),
])
def test_secondary_capture_refuses_what_is_not_an_rgb_picture(rgb, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8 \\(rows, columns, 3\\)"):
        write_secondary_capture(radiograph(), rgb, tmp_path, description="x")


# --- overlay -------------------------------------------------------------------------------


def test_overlay_leaves_the_image_where_the_map_is_zero_and_colours_its_peak() -> None:
    grey = np.linspace(0.0, 1.0, 12 * 10).reshape(12, 10)
    heat = np.zeros_like(grey)
    heat[6, 5] = 1.0
    rgb = overlay(grey, heat)
    assert rgb.dtype == np.uint8 and rgb.shape == (12, 10, 3)
    plain = np.rint(grey * 255).astype(np.uint8)
    untouched = heat == 0
    for c in range(3):
        assert np.array_equal(rgb[..., c][untouched], plain[untouched])
    r, g, b = (int(v) for v in rgb[6, 5])
    assert r > g and r > b  # the hottest pixel is red


def test_overlay_refuses_mismatched_or_invalid_maps() -> None:
    with pytest.raises(ValueError, match="same shape"):
        overlay(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        overlay(np.zeros((4, 4)), np.full((4, 4), np.nan))
