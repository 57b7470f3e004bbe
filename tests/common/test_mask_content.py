"""A mask whose header agrees with its image but whose content is flipped or rotated is refused.

The finding (issue 17): a radiograph with a lung mask rotated 180 degrees (same rows and
columns) was accepted and trained on. Masks of two nearly mirror-image lungs, correct, must pass.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from common.data import ImageError, Preprocess
from common.data.mask_content import check_mask_content, edge_scores
from common.data.site import SiteData
from medfed.cli import EXIT_BAD_INPUT, EXIT_OK, app
from tests.common.conftest import write_labels
from tests.common.mask_files import (
    chest_radiograph,
    fundus_photo,
    write_itk_mask,
    write_radiograph,
)

PRE = Preprocess(image_size=64)


# The phantoms' lungs sit mid-image, so that on some seeds a rotated copy still covers most of
# the lung fields: at 160 x 128 pixels 25 of seeds 0-29 rotated 180 degrees and 17 flipped
# up-down are refused (README "Masks" has the rates on 300 phantoms and on real MR). The
# flipped rows below use seeds 2 and 3, which are among them; correct masks pass on every seed.
FLIPPED_SEEDS = (2, 3)


def radiograph_site(root, masks, seeds=None):
    """Training rows img{i}.dcm (a phantom radiograph of seeds[i]) with m{i}.nii.gz =
    masks[i](its lungs)."""
    lines = []
    for i, transform in enumerate(masks):
        pixels, lungs = chest_radiograph(seed=seeds[i] if seeds else i)
        write_radiograph(root / f"images/img{i}.dcm", pixels)
        write_itk_mask(root / f"masks/m{i}.nii.gz", transform(lungs))
        lines.append([f"images/img{i}.dcm", 1, f"masks/m{i}.nii.gz", "train"])
    write_labels(root, lines, header="path,label,mask,split")
    return root


def problems(site, tmp_path):
    data = SiteData(site, PRE, cache_dir=tmp_path / "cache", masks=True)
    train = data.split("train")
    return train, {p.path: p.reason for p in data.problems}


@pytest.mark.parametrize(
    ("transform", "named"),
    [(lambda m: np.rot90(m, 2), "rotated 180 degrees"), (lambda m: m[::-1], "flipped up-down")],
)
def test_a_rotated_lung_mask_on_a_radiograph_is_refused(tmp_path, transform, named):
    site = radiograph_site(tmp_path / "s", [lambda m: m, transform], seeds=(0, FLIPPED_SEEDS[0]))
    train, found = problems(site, tmp_path)
    reason = found.get("masks/m1.nii.gz")
    assert reason is not None, "the rotated mask was accepted"
    assert f"mask masks/m1.nii.gz appears {named} against images/img1.dcm" in reason
    assert "row images/img1.dcm skipped" in reason
    assert "masks/m0.nii.gz" not in found and len(train.labels) == 1


def test_correct_masks_of_two_mirror_image_lungs_are_accepted(tmp_path):
    site = radiograph_site(tmp_path / "s", [lambda m: m] * 12)
    train, found = problems(site, tmp_path)
    assert found == {} and len(train.labels) == 12


def scores_of(image: np.ndarray, labels: np.ndarray) -> dict[str, float] | None:
    grey = (image.astype(np.float64) - image.min()) / max(float(np.ptp(image)), 1e-9)
    return edge_scores(grey[None], np.ascontiguousarray(labels)[None])


def test_thin_vessel_masks_pass_and_their_transposed_copies_are_named(tmp_path):
    for seed in range(3):
        photo, vessels = fundus_photo(seed)
        check_mask_content(photo[None] / 255.0, vessels[None], mask="v.png", against="f.png")
        with pytest.raises(ImageError, match=r"mask v.png appears transposed \(rows and columns "
                           r"swapped\) against f.png: its outline follows the image's edges"):
            check_mask_content(photo[None] / 255.0, vessels.T[None], mask="v.png",
                               against="f.png")


def test_a_faint_structure_barely_above_the_noise_is_not_refused():
    yy, xx = np.mgrid[:96, :80]
    blob = ((yy - 30) ** 2 / 15**2 + (xx - 50) ** 2 / 9**2) < 1
    for seed in range(5):
        noisy = 0.5 + 0.1 * blob + 0.1 * np.random.default_rng(seed).standard_normal(blob.shape)
        scores = scores_of(noisy, blob)
        assert scores is not None
        check_mask_content(noisy[None], blob[None].astype(np.uint8), mask="m", against="i")


def test_empty_and_tiny_masks_are_not_judged():
    photo, _ = chest_radiograph(seed=1)
    empty = np.zeros_like(photo, dtype=np.uint8)
    assert scores_of(photo, empty) is None
    tiny = empty.copy()
    tiny[20:24, 30:34] = 1  # a 4 x 4 pixel lesion: some flip of it lands on an edge by chance
    assert scores_of(photo, tiny) is None


def test_check_data_lists_a_rotated_mask_and_exits_2_when_no_row_is_left(tmp_path):
    site = radiograph_site(tmp_path / "s", [lambda m: np.rot90(m, 2)], seeds=FLIPPED_SEEDS[1:])
    result = CliRunner().invoke(app, ["check-data", "--task", "segment", str(site)])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    text = " ".join(result.output.split())
    assert "masks/m0.nii.gz: mask masks/m0.nii.gz appears rotated 180 degrees against " \
           "images/img0.dcm" in text
    assert "NOT USABLE: no readable training image with a usable mask" in text
    # next to a correct row the site stays usable, and the rotated mask is still listed
    site = radiograph_site(tmp_path / "t", [lambda m: m, lambda m: np.rot90(m, 2)],
                           seeds=(0, FLIPPED_SEEDS[0]))
    result = CliRunner().invoke(app, ["check-data", "--task", "segment", str(site)])
    assert result.exit_code == EXIT_OK, result.output
    text = " ".join(result.output.split())
    assert "appears rotated 180 degrees against images/img1.dcm" in text
    assert "masks placed by: ITK 2D convention: 1" in text
    assert "note: NIfTI masks without a patient frame to compare were read by ITK's 2D " \
           "convention: array (Columns, Rows), affine diag(-1, -1, 1)" in text
