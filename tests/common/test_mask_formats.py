"""PNG label maps and DICOM SEG objects as masks (issue 17 item 7)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.data import ImageError, Preprocess, load_image, load_mask
from common.data.alignment import PIXEL_GRID, SEG_REFERENCE
from common.data.image import decode_mask
from tests.common.conftest import write_dicom
from tests.common.mask_files import chest_radiograph, write_radiograph, write_seg

PRE = Preprocess(image_size=64)


@pytest.fixture
def radiograph(tmp_path):
    """A phantom radiograph and its two lungs labelled 1 (patient right) and 2 (left)."""
    pixels, lungs = chest_radiograph(seed=3)
    labels = lungs.copy()
    labels[:, labels.shape[1] // 2:] *= 2
    return write_radiograph(tmp_path / "img.dcm", pixels), labels


def placed(mask, image):
    """The mask at full resolution on the image's grid, and how it was placed."""
    like = load_image(image, PRE).meta
    size = Preprocess(image_size=max(like.rows, like.cols))
    out, _, placement = decode_mask(mask, size, like=like, image=image)
    top = (max(like.rows, like.cols) - like.rows) // 2
    left = (max(like.rows, like.cols) - like.cols) // 2
    return out[0, 0, top:top + like.rows, left:left + like.cols], placement


@pytest.mark.parametrize("mode", ["L", "P", "binary 0/255"])
def test_a_png_label_map_is_the_image_pixel_grid(tmp_path, radiograph, mode):
    image, labels = radiograph
    if mode == "binary 0/255":
        labels = (labels > 0).astype(np.uint8)
        png = Image.fromarray(labels * 255, mode="L")
    else:
        png = Image.fromarray(labels, mode="L").convert(mode) if mode == "P" else \
            Image.fromarray(labels, mode="L")
    png.save(tmp_path / "mask.png")
    mask, placement = placed(tmp_path / "mask.png", image)
    np.testing.assert_array_equal(mask, labels)
    assert placement == PIXEL_GRID


def test_a_png_mask_of_other_size_or_in_colour_is_refused(tmp_path, radiograph):
    image, labels = radiograph
    Image.fromarray(labels[:-4], mode="L").save(tmp_path / "short.png")
    like = load_image(image, PRE)
    with pytest.raises(ImageError, match=r"mask 1 slices of 156x128, image 1 slices of 160x128"):
        load_mask(tmp_path / "short.png", PRE, like=like, image=image)
    Image.fromarray(np.stack([labels] * 3, -1) * 80, mode="RGB").save(tmp_path / "rgb.png")
    with pytest.raises(ImageError, match="PNG mask in colour mode RGB; save the labels as a grey"):
        load_mask(tmp_path / "rgb.png", PRE, like=like, image=image)


def test_a_dicom_seg_of_the_image_becomes_its_label_map(tmp_path, radiograph):
    image, labels = radiograph
    seg = write_seg(tmp_path / "seg.dcm", image, labels)
    mask, placement = placed(seg, image)
    np.testing.assert_array_equal(mask, labels)  # segment number = label
    assert placement == SEG_REFERENCE


def test_a_dicom_seg_of_another_image_is_refused(tmp_path, radiograph):
    image, labels = radiograph
    other = write_radiograph(tmp_path / "other.dcm", chest_radiograph(seed=4)[0])
    seg = write_seg(tmp_path / "seg.dcm", other, labels)
    like = load_image(image, PRE)
    with pytest.raises(ImageError, match=r"DICOM SEG seg.dcm segments other images \(it "
                       r"references 1\.2\..*\), not img.dcm \(SOP Instance UID 1\.2\..*\); list "
                       r"the SEG made from this image"):
        load_mask(seg, PRE, like=like, image=image)


def test_a_dicom_seg_maps_onto_a_series_slice_by_slice(tmp_path, mr):
    folder = tmp_path / "series"
    labels = np.zeros((3, 32, 32), np.uint8)
    for i, z in enumerate([4.0, 0.0, 2.0]):  # file order is not slice order
        write_dicom(folder / f"{i}.dcm", mr(i), ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                    ImagePositionPatient=[0, 0, z], PixelSpacing=[1, 1], InstanceNumber=i + 1,
                    SliceThickness=2, FrameOfReferenceUID="1.2.826.0.1.3680043.8.498.3")
    # one SEG over the whole series, as viewers write it
    labels[1, 5:9, 20:30] = 1  # on the slice at z = 2 (the reader's middle slice)
    labels[2, 10:20, 3:6] = 2  # at z = 4
    seg = write_series_seg(tmp_path / "seg.dcm", folder, labels)
    like = load_image(folder, Preprocess(image_size=32))
    mask = load_mask(seg, Preprocess(image_size=32), like=like, image=folder)
    np.testing.assert_array_equal(mask[:, 0], labels)


def write_series_seg(path, folder, labels):
    """A SEG over the series in `folder`; labels are in the reader's (ascending z) order."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files = sorted(folder.iterdir())
    sources = [pydicom.dcmread(f) for f in files]
    for ds in sources:
        ds.PatientID, ds.PatientName = "T", "T^T"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.4"
        for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "AccessionNumber", "ReferringPhysicianName"):
            setattr(ds, keyword, "")
        ds.StudyID, ds.SeriesNumber = "1", 1
    order = np.argsort([float(ds.ImagePositionPatient[2]) for ds in sources])
    per_file = np.empty_like(labels)
    per_file[order] = labels  # the reader's slice k is the file order[k]
    stacked = np.stack([per_file == n for n in (1, 2)], axis=-1).astype(np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=f"s{n}", segmented_property_category=codes.SCT.Organ,
            segmented_property_type=codes.SCT.Lung,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n in (1, 2)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=stacked,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medfed tests",
        manufacturer_model_name="tests", software_versions="1", device_serial_number="1",
    )
    seg.save_as(path)
    return path
