"""`medfed sample`: synthetic DICOM in the site layout that check-data accepts."""

import pydicom
import pytest
import torch

from common.config import ConfigError, RunConfig
from common.data import Preprocess, check_site
from models import build_model
from server.sample import write_samples


def _run(tmp_path, task="synthesize"):
    cfg = RunConfig(task=task, image_size=16)
    model = build_model(cfg.model, in_channels=1, num_classes=2, image_size=16)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": cfg.model, "state_dict": model.state_dict(), "config": cfg.to_mapping(),
                "model_args": {"in_channels": 1, "num_classes": 2, "image_size": 16}},
               run / "model.pt")
    return run


def test_sample_writes_derived_identifier_free_dicom_that_check_data_accepts(tmp_path):
    out = tmp_path / "synthetic"
    counts = write_samples(_run(tmp_path), out, n=6, seed=1)
    assert counts == {0: 3, 1: 3}
    files = sorted((out / "images").glob("*.dcm"))
    assert len(files) == 6
    ds = pydicom.dcmread(files[0])
    assert list(ds.ImageType)[0] == "DERIVED"
    assert ds.BurnedInAnnotation == "NO"
    assert str(ds.PatientName) == "" and ds.PatientID == ""
    assert ds.PatientIdentityRemoved == "YES"
    card = check_site(out, Preprocess(image_size=16))
    assert card.usable
    assert (out / "labels.csv").read_text().splitlines()[0] == "path,label"


def test_sample_refuses_a_run_that_is_not_a_gan(tmp_path):
    with pytest.raises(ConfigError, match="not synthesize"):
        write_samples(_run(tmp_path, task="autoencode"), tmp_path / "o", n=2)
