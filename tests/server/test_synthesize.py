"""Train-on-synthetic/test-on-real: the generated images carry the classes they are labelled."""

from types import SimpleNamespace

import numpy as np
import torch

from common.config import RunConfig
from server.tasks import synthesize
from server.tasks.base import build


def test_tstr_labels_are_the_classes_the_images_were_generated_for(monkeypatch, tmp_path):
    cfg = RunConfig(task="synthesize", image_size=16, out=str(tmp_path))
    train_labels = np.array([1, 0, 0, 1, 1, 0, 1])
    seen = {}

    def fake_generate(state, cfg_, classes, seed):
        # an image's every pixel is the class it was generated for
        return np.broadcast_to(classes[:, None, None, None].astype(np.float32),
                               (len(classes), 1, 16, 16)).copy()

    def fake_train(cfg_, images, labels, seed):
        seen["images"], seen["labels"] = images, labels
        return torch.nn.Identity()

    monkeypatch.setattr(synthesize, "generate", fake_generate)
    monkeypatch.setattr(synthesize, "train_classifier", fake_train)
    monkeypatch.setattr(synthesize, "evaluate", lambda *a, **k: {"auc": 0.9})
    central = synthesize.SynthesizeCentral()
    central._reference = SimpleNamespace(  # type: ignore[assignment]
        train_labels=train_labels, test_images=np.zeros((2, 1, 16, 16), np.float32),
        test_labels=np.array([0, 1]), trtr_auc=0.95,
    )
    out = central.finish(tmp_path, cfg, build(cfg).state_dict(), [])
    np.testing.assert_array_equal(seen["labels"], train_labels)
    np.testing.assert_array_equal(seen["images"][:, 0, 0, 0], train_labels)
    assert out["tstr_ratio"] == 0.9 / 0.95


def test_generate_draws_each_requested_class():
    """`generate` passes the classes through: class 0 and class 1 images differ for one seed."""
    torch.manual_seed(0)
    cfg = RunConfig(task="synthesize", image_size=16)
    state = build(cfg).state_dict()
    zeros = synthesize.generate(state, cfg, np.zeros(4, np.int64), seed=0)
    ones = synthesize.generate(state, cfg, np.ones(4, np.int64), seed=0)
    assert zeros.shape == ones.shape == (4, 1, 16, 16)
    assert np.abs(zeros - ones).max() > 1e-4
