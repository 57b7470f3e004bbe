"""Replies built the way client/app.py builds them, for the audit and guard tests."""


import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.privacy import PrivacyState
from models import build_model


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", in_channels=1, num_classes=2, image_size=32)


def _privacy() -> dict[str, float | int | str]:
    state = PrivacyState(
        noise_multiplier=1.1, sample_rate=0.25, planned_steps=40, target_epsilon=8.0,
        delta=1e-5, accountant="rdp", max_grad_norm=1.0, history=[(1.1, 0.25, 8)],
    )
    return state.summary()


def train_reply(site: str = "site-a", model: torch.nn.Module | None = None) -> RecordDict:
    summary = _privacy()
    metrics = {
        "epsilon": float(summary["epsilon"]), "train-loss": 0.61, "num-examples": 32,
        "train-seconds": 1.5, "steps": 8,
    }
    return RecordDict(
        {
            "privacy": ConfigRecord(dict(summary)),
            "arrays": ArrayRecord((model or _model()).cpu().state_dict()),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site}),
        }
    )


def evaluate_reply(site: str = "site-a") -> RecordDict:
    metrics = {
        "auc": 0.81, "accuracy": 0.75, "sensitivity": 0.7, "specificity": 0.8, "loss": 0.52,
        "num-examples": 12,
    }
    return RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site})})
