"""A site's privacy across rounds: its DP plan, its epsilon budget and its validation releases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, ConfigRecordValues, Context

from client import validation
from common.config import RunConfig, check_budget
from common.operating import RELEASE
from common.privacy import VALIDATION_EPSILON, PrivacyState
from common.sites import SiteRef
from common.training.tasks import SplitLoader
from common.training.tasks.base import Task
from common.training.tasks.classify import CLASS_COUNTS


def _privacy_path(site: SiteRef, run_key: str) -> Path:
    return site.state_dir / "privacy" / f"{run_key}.json"


def _load_or_plan_privacy(site: SiteRef, cfg: RunConfig, run_key: str, n: int) -> PrivacyState:
    path = _privacy_path(site, run_key)
    if path.is_file():
        return PrivacyState.load(path)
    return PrivacyState.plan(
        num_examples=n,
        batch_size=cfg.batch_size,
        rounds=cfg.rounds,
        steps_per_round=cfg.steps_per_round(n),
        target_epsilon=cfg.target_epsilon,
        delta=cfg.delta,
        accountant=cfg.accountant,
        max_grad_norm=cfg.max_grad_norm,
    )


def _budget(context: Context, cfg: RunConfig) -> tuple[float | None, Path | None]:
    """The site's epsilon budget and ledger folder.

    Deployed, both come from the site's own node config (`medfed site`), never from the run
    config the aggregator sends: the aggregator cannot raise a hospital's budget. In simulation
    the run config stands in for every virtual site's.
    """
    node = context.node_config
    if "data-path" in node:
        given = node.get("budget-epsilon")
        budget = None if given in (None, "") else check_budget(
            given, "the node config's budget-epsilon (`medfed site --budget-epsilon`)"
        )
        folder = str(node.get("ledger-dir", "") or "")
    else:
        budget = cfg.budget_epsilon or None  # a run config's 0: no budget
        folder = cfg.ledger_dir
    return budget, (Path(folder) if folder else None)


def _shared_histograms(
    context: Context, cfg: RunConfig, site: SiteRef, histograms: np.ndarray, server_round: int,
    releases: dict[str, float],
) -> tuple[np.ndarray | None, float | None]:
    """The validation-score histograms that may leave this round, and the split's epsilon.

    The epsilon is None without DP.
    Without DP: the counts, every round. With DP: one noisy release per run
    (client.validation), in its final round, by a site that trained in the run: a site that
    took no part spends nothing on a model it did not train.
    """
    if not cfg.dp:
        return histograms, None
    if server_round != cfg.rounds or RELEASE not in releases:
        return None, None
    run_key = cfg.run_key or str(context.run_id)
    if not _privacy_path(site, run_key).is_file():  # never trained in this run
        return None, None
    budget, ledger_dir = _budget(context, cfg)
    made = validation.release(site, cfg, run_key, releases, RELEASE, histograms,
                              budget=budget, ledger_dir=ledger_dir)
    return (None, None) if made is None else made


def _privacy_record(privacy: PrivacyState, site: SiteRef, run_key: str) -> ConfigRecord:
    """The training's privacy summary, and the validation split's epsilon once it spent any."""
    record: dict[str, ConfigRecordValues] = dict(privacy.summary())
    val_epsilon = validation.spent(site, run_key)
    if val_epsilon is not None:
        record[VALIDATION_EPSILON] = val_epsilon
    return ConfigRecord(record)


def _private_class_counts(
    context: Context, cfg: RunConfig, site: SiteRef, task: Task, load: SplitLoader,
) -> np.ndarray | None:
    """Under DP, the class counts logit adjustment uses: the validation split's, noised once.

    Counting the training images would make every per-sample gradient depend on the whole
    training set, which DP-SGD's analysis does not cover; the validation split has the same
    classes in about the same proportions and its release is accounted on its own images.
    None: no validation images (the site trains without adjustment).
    """
    releases = task.releases(cfg)
    if CLASS_COUNTS not in releases:
        return None
    _, labels = task.load(site, cfg, "val", load)[:2]
    if len(labels) == 0:
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=cfg.num_classes)
    budget, ledger_dir = _budget(context, cfg)
    made = validation.release(site, cfg, cfg.run_key or str(context.run_id), releases,
                              CLASS_COUNTS, counts.astype(np.float64), budget=budget,
                              ledger_dir=ledger_dir)
    return None if made is None else made[0]
