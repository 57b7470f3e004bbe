"""`medfed audit-privacy`: measure what a trained model gives away about its training images.

A loss-threshold membership-inference attack (Yeom et al., 2018): a model fits the images it
was trained on better than images it never saw, so an attacker holding the model and a candidate
image guesses "member" when the image's loss is low. The attack's AUC over members (each site's
training split) and non-members (the same sites' validation and test splits, never trained on)
measures the leakage:
0.5 is a coin toss, 1.0 a model that names its training images. DP-SGD bounds how far above 0.5
any attack can go; this measures where a given run actually is.

Members and non-members are balanced per site (the larger group is subsampled with the seed),
so the AUC compares like with like and no site dominates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from common.data import Preprocess, SiteData
from common.modelfile import load_model_file
from common.sites import discover_sites
from models import build_model

AUDIT_FILE = "privacy_audit.json"


def load_model(run_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The run's final model (model.pt) and the config it was trained with."""
    path = run_dir / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no model.pt; pass a finished run folder (`medfed simulate --out`)"
        )
    saved = load_model_file(path)
    model = build_model(saved["model"], **saved["model_args"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), dict(saved.get("config", {}))


def per_sample_loss(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy of every image under the model."""
    losses = []
    with torch.no_grad():
        for start in range(0, len(labels), 256):
            x = torch.as_tensor(images[start : start + 256], dtype=torch.float32)
            y = torch.as_tensor(labels[start : start + 256], dtype=torch.long)
            losses.append(nn.functional.cross_entropy(model(x), y, reduction="none").numpy())
    return np.concatenate(losses) if losses else np.zeros(0, dtype=np.float32)


def _balanced(n_members: int, n_outside: int, rng: np.random.Generator) -> tuple[Any, Any]:
    k = min(n_members, n_outside)
    return (np.sort(rng.choice(n_members, k, replace=False)),
            np.sort(rng.choice(n_outside, k, replace=False)))


def audit_privacy(run_dir: Path, data: Path, *, seed: int = 0) -> dict[str, Any]:
    """Run the attack on every site under `data` (or on `data` itself, one site folder)."""
    model, config = load_model(run_dir)
    pre = Preprocess(
        image_size=int(config.get("image-size", 64)), channels=int(config.get("channels", 1))
    )
    folders = [data] if (data / "labels.csv").is_file() else discover_sites(data)
    rng = np.random.default_rng(seed)
    scores: list[np.ndarray] = []
    truth: list[np.ndarray] = []
    per_site: dict[str, dict[str, Any]] = {}
    for folder in folders:
        site = SiteData(folder, pre, seed=int(config.get("seed", 0)))
        # non-members: the validation and test splits, which no round ever trained on
        splits = {name: site.split(name) for name in ("train", "val", "test")}
        keep = {name: s.labels >= 0 for name, s in splits.items()}
        loss = {
            name: per_sample_loss(model, s.images[keep[name]], s.labels[keep[name]])
            for name, s in splits.items()
        }
        held_out = np.concatenate([loss["val"], loss["test"]])
        inside, outside = _balanced(len(loss["train"]), len(held_out), rng)
        if len(inside) == 0:
            continue
        site_scores = np.concatenate([-loss["train"][inside], -held_out[outside]])
        site_truth = np.concatenate([np.ones(len(inside)), np.zeros(len(outside))])
        scores.append(site_scores)
        truth.append(site_truth)
        per_site[folder.name] = {
            "attack_auc": float(roc_auc_score(site_truth, site_scores)),
            "members": len(inside), "non_members": len(outside),
            "member_loss": float(loss["train"][inside].mean()),
            "non_member_loss": float(held_out[outside].mean()),
        }
    if not scores:
        raise ValueError(f"{data}: no site has both training and held-out images to attack")
    all_truth, all_scores = np.concatenate(truth), np.concatenate(scores)
    result = {
        "attack": "loss threshold (Yeom et al. 2018), balanced members vs held-out non-members",
        "attack_auc": float(roc_auc_score(all_truth, all_scores)),
        "members": int(all_truth.sum()), "non_members": int(len(all_truth) - all_truth.sum()),
        "dp": bool(config.get("dp", False)),
        "target_epsilon": config.get("target-epsilon") if config.get("dp") else None,
        "sites": per_site,
    }
    (run_dir / AUDIT_FILE).write_text(json.dumps(result, indent=2))
    return result
