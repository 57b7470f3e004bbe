"""A mask whose header agrees with its image but whose content is flipped or rotated is refused.

The finding (issue 17): a radiograph with a lung mask rotated 180 degrees (same rows and
columns) was accepted and trained on. Masks of two nearly mirror-image lungs, correct, must pass.
"""

from __future__ import annotations

import numpy as np
import pytest

from common.data import Preprocess
from common.data.site import SiteData
from tests.common.conftest import write_labels
from tests.common.mask_files import chest_radiograph, write_itk_mask, write_radiograph

PRE = Preprocess(image_size=64)


def radiograph_site(root, masks):
    """Training rows img{i}.dcm (a phantom radiograph) with m{i}.nii.gz = masks[i](its lungs)."""
    lines = []
    for i, transform in enumerate(masks):
        pixels, lungs = chest_radiograph(seed=i)
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
    site = radiograph_site(tmp_path / "s", [lambda m: m, transform])
    train, found = problems(site, tmp_path)
    reason = found.get("masks/m1.nii.gz")
    assert reason is not None, "the rotated mask was accepted"
    assert f"mask masks/m1.nii.gz appears {named} against images/img1.dcm" in reason
    assert "row images/img1.dcm skipped" in reason
    assert "masks/m0.nii.gz" not in found and len(train.labels) == 1
