"""Recipe choices on real hospital layouts: FedAvg or SCAFFOLD, augmentation on or off, seeds.

    .venv/bin/python -m bench.recipes data/bm-hard                      # the four recipes, seed 0
    .venv/bin/python -m bench.recipes data/bm-hard --seeds 0 1 2 --dp
    .venv/bin/python -m bench.recipes data/bm-hard --central            # one pooled model

DATA is a folder of hospitals as `../shared/data/make_sites.py` writes them (`DATA/sites/*`,
`DATA/test`). Each recipe trains in this process with the sites' own code: ClassifyTask.train
(logit adjustment, augmentation, DP-SGD through Opacus) for every site of every round, FedAvg's
examples-weighted mean, and for SCAFFOLD common.training.scaffold.DriftCorrection at the sites
with the aggregator's update of c (server.scaffold's rule, every site taking part). No Flower and no
Ray: a recipe costs seconds per round instead of the simulation's start-up, so several seeds
fit. `medfed simulate` runs the same training and the same aggregation; bench/run.py's
BreastMNIST rows are those end-to-end runs.

The test AUC is of the final global model on DATA/test; the threshold is Youden's on the
sites' pooled validation scores (noise-free here: the aggregator's histogram choice under DP is
tested elsewhere). The CSV rows are printed and appended to bench/out/recipes.csv.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from common.config import RunConfig
from common.data import SiteData
from common.privacy import PrivacyState
from common.sites import discover_sites
from common.training.loop import LocalTraining
from common.training.scaffold import DriftCorrection
from common.training.tasks.base import Fit, preprocess
from common.training.tasks.classify import ClassifyTask
from models import build_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "recipes.csv"
RECIPES = {
    "fedavg": ("fedavg", False), "fedavg+augment": ("fedavg", True),
    "scaffold": ("scaffold", False), "scaffold+augment": ("scaffold", True),
}
Split = tuple[np.ndarray, np.ndarray]


def load(data: Path, cfg: RunConfig) -> tuple[list[tuple[Split, Split]], Split]:
    """Each site's (train, val) labelled images, and the test set."""
    pre = preprocess(cfg)
    sites = []
    for folder in discover_sites(data / "sites"):
        site = SiteData(folder, pre, seed=0)
        parts = []
        for split in ("train", "val"):
            arrays = site.split(split)
            keep = arrays.labels >= 0
            parts.append((arrays.images[keep], arrays.labels[keep]))
        sites.append((parts[0], parts[1]))
    test = SiteData(data / "test", pre, seed=0).split("test")
    return sites, (test.images, test.labels)


@torch.no_grad()
def scores(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """P(class 1) of every image."""
    model.eval()
    out = [torch.softmax(model(torch.as_tensor(images[i:i + 256])), 1)[:, 1].numpy()
           for i in range(0, len(images), 256)]
    return np.concatenate(out)


def run(sites: list[tuple[Split, Split]], test: Split, cfg: RunConfig) -> dict[str, float]:
    """Train `cfg.rounds` rounds of the recipe; the final model's test figures."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_channels=cfg.channels, num_classes=2,
                        image_size=cfg.image_size)
    task = ClassifyTask()
    settings = LocalTraining(steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                             optimizer=cfg.optimizer)
    privacy = [PrivacyState.plan(
        num_examples=len(train[1]), batch_size=cfg.batch_size, rounds=cfg.rounds,
        steps_per_round=cfg.steps_per_round(len(train[1])),
        target_epsilon=cfg.target_epsilon, delta=cfg.delta,
        accountant=cfg.accountant, max_grad_norm=cfg.max_grad_norm,
    ) if cfg.dp else None for train, _ in sites]
    rng = np.random.default_rng(cfg.seed)
    # under DP a site's logit adjustment uses its validation counts with noise 5, as deployed
    counts = [np.bincount(val[1], minlength=2) + (rng.normal(0, 5, 2) if cfg.dp else 0)
              for _, val in sites]
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    control = {k: np.zeros(v.shape, np.float32) for k, v in global_state.items()}
    site_controls: list[dict[str, np.ndarray]] = [{} for _ in sites]
    for r in range(1, cfg.rounds + 1):
        states, weights, deltas = [], [], []
        for i, (train, _) in enumerate(sites):
            model.load_state_dict(global_state)
            model.train()
            drift = (DriftCorrection(control, site_controls[i])
                     if cfg.strategy == "scaffold" else None)
            fit = Fit(settings, torch.device("cpu"), privacy[i], seed=cfg.seed * 1000 + r,
                      proximal=False, class_counts=counts[i] if cfg.dp else None, hooks=drift)
            task.train(model, train, cfg, fit)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(train[1]))
            if drift is not None:
                site_controls[i], delta = drift.updated()
                deltas.append(delta)
        share = np.asarray(weights, float) / sum(weights)
        global_state = {k: sum(float(w) * s[k].float() for w, s in zip(share, states,
                                                                        strict=True))
                        for k in global_state}
        if deltas:  # c moves by the examples-weighted mean delta c_i (every site took part)
            for k in control:
                control[k] = control[k] + sum(float(w) * d[k] for w, d in zip(share, deltas,
                                                                              strict=True))
    model.load_state_dict(global_state)
    val_images = np.concatenate([val[0] for _, val in sites])
    val_labels = np.concatenate([val[1] for _, val in sites])
    fpr, tpr, thresholds = roc_curve(val_labels, scores(model, val_images))
    threshold = float(thresholds[np.argmax(tpr - fpr)])
    test_scores = scores(model, test[0])
    positive, labels = test_scores >= threshold, test[1]
    sensitivity = float(positive[labels == 1].mean())
    specificity = float((~positive[labels == 0]).mean())
    return {"auc": float(roc_auc_score(labels, test_scores)), "sensitivity": sensitivity,
            "specificity": specificity, "balanced_accuracy": (sensitivity + specificity) / 2,
            "epsilon": max((p.epsilon() for p in privacy if p is not None), default=0.0)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen recipes over the seeds; print and append CSV rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=20, help="as the issue-16 check runs")
    parser.add_argument("--dp", action="store_true", help="DP-SGD at epsilon 8 per site")
    parser.add_argument("--central", action="store_true",
                        help="pool every site into one (the centralised reference)")
    args = parser.parse_args(argv)
    if not (args.data / "sites").is_dir() or not (args.data / "test").is_dir():
        print(f"error: {args.data} has no sites/ and test/ folders; lay the data out with "
              "../shared/data/make_sites.py", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    base = RunConfig(rounds=args.rounds, dp=args.dp)
    sites, test = load(args.data, base)
    if args.central:
        pooled = [(np.concatenate([s[k][0] for s in sites]),
                   np.concatenate([s[k][1] for s in sites])) for k in (0, 1)]
        sites = [(pooled[0], pooled[1])]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fresh = not OUT.is_file()
    with OUT.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if fresh:
            writer.writerow(["data", "recipe", "dp", "central", "seed", "rounds", "auc",
                             "sensitivity", "specificity", "balanced_accuracy", "epsilon",
                             "seconds"])
        for name in args.recipes:
            strategy, augment = RECIPES[name]
            for seed in args.seeds:
                cfg = RunConfig(rounds=args.rounds, dp=args.dp, strategy=strategy,
                                augment=augment, seed=seed)
                started = time.perf_counter()
                figures = run(sites, test, cfg)
                row = [args.data.name, name, args.dp, args.central, seed, args.rounds,
                       *(f"{figures[k]:.4f}" for k in ("auc", "sensitivity", "specificity",
                                                      "balanced_accuracy", "epsilon")),
                       f"{time.perf_counter() - started:.0f}"]
                writer.writerow(row)
                handle.flush()
                print(",".join(map(str, row)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
