"""The ClientApp that runs inside a hospital: trains and evaluates the global model on local images.

What leaves the site in a reply: the model's arrays, scalar metrics (loss, AUC, dataset sizes,
epsilon), the site's name and its DP accounting parameters. No image, header, path or identifier.

Where the site's data is:
- `medfed simulate`: the sites are handed to `make_client_app`, indexed by Flower's partition-id.
- deployment (`flwr-supernode --node-config "data-path=... site-name=... state-dir=..."`).
- `flwr run .` on a local simulation: `sites-dir` from the run config, indexed by partition-id.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client import progress
from client.audit import DEFAULT_CONFIGS, DEFAULT_METRICS, AuditLog, OutboundGuard, describe_reply
from client.ledger import BudgetRefused, PrivacyLedger
from client.train import LocalTraining, evaluate, resolve_device, train_local, train_local_dp
from common.config import RunConfig
from common.data import Preprocess, SiteData
from common.privacy import REFUSAL_MARK, PrivacyState, batches_per_epoch
from common.sites import SiteRef, discover_sites
from models import build_model

log = logging.getLogger("medfed.client")

# A simulation worker hosts many virtual sites in turn; keep only the few most recent in memory.
_SITE_CACHE_SIZE = 2
_site_cache: OrderedDict[tuple[Path, Preprocess], SiteData] = OrderedDict()


def _site_data(site: SiteRef, pre: Preprocess, seed: int) -> SiteData:
    key = (site.data_dir.resolve(), pre)
    data = _site_cache.pop(key, None) or SiteData(site.data_dir, pre, seed=seed)
    _site_cache[key] = data
    while len(_site_cache) > _SITE_CACHE_SIZE:
        _site_cache.popitem(last=False)
    return data


def _labelled(data: SiteData, split: str) -> tuple[np.ndarray, np.ndarray]:
    arrays = data.split(split)
    keep = arrays.labels >= 0
    return arrays.images[keep], arrays.labels[keep]


def resolve_site(context: Context, cfg: RunConfig, sites: Sequence[SiteRef] | None) -> SiteRef:
    """Which site this node is, from the simulation's site list or the node's own config."""
    node = context.node_config
    if "data-path" in node:
        data_dir = Path(str(node["data-path"]))
        name = str(node.get("site-name", data_dir.name))
        state_dir = Path(str(node.get("state-dir", Path.home() / ".medfed" / "sites" / name)))
        return SiteRef(name, data_dir, state_dir)
    if "partition-id" not in node:
        raise ValueError(
            "this node has no data: start the SuperNode with "
            '--node-config "data-path=/path/to/site"'
        )
    index = int(node["partition-id"])
    if sites is None:
        if not cfg.sites_dir:
            raise ValueError("set sites-dir in the run config to the folder of site folders")
        found = discover_sites(Path(cfg.sites_dir))
        state_root = Path(cfg.out) / "site-state"
        sites = [SiteRef(p.name, p, state_root / p.name) for p in found]
    if index >= len(sites):
        raise ValueError(f"partition-id {index} but only {len(sites)} site folders were found")
    return sites[index]


def _check_labels(labels: np.ndarray, cfg: RunConfig, site: SiteRef) -> None:
    if len(labels) and int(labels.max()) >= cfg.num_classes:
        raise ValueError(
            f"site {site.name}: label {int(labels.max())} found but the run has "
            f"--num-classes {cfg.num_classes}; labels must be 0..{cfg.num_classes - 1}"
        )


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
        local_epochs=cfg.local_epochs,
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
        raw = float(node.get("budget-epsilon", 0) or 0)
        folder = str(node.get("ledger-dir", "") or "")
    else:
        raw, folder = cfg.budget_epsilon, cfg.ledger_dir
    return (raw if raw > 0 else None), (Path(folder) if folder else None)


# What may leave the site in a reply (client.audit); an AUC is NaN on a one-class validation split.
GUARD = OutboundGuard(DEFAULT_METRICS, DEFAULT_CONFIGS, allow_nan=True)
AUDIT_FILE = "audit.jsonl"


class SiteFailure(RuntimeError):
    """What the aggregator is told when the site fails: the kind of failure, no details."""


def _leave(
    site: SiteRef, content: RecordDict, *, run: str, server_round: int, message_type: str
) -> RecordDict:
    """Check a reply against the outbound guard and log it in the site's audit trail."""
    GUARD.check(content)
    AuditLog(site.state_dir / AUDIT_FILE).append(
        describe_reply(content, run=run, round=server_round, message_type=message_type)
    )
    return content


def _contained(
    stage: str, handler: Callable[[Message, Context], Message]
) -> Callable[[Message, Context], Message]:
    """Keep a failure's details at the site.

    Flower sends a ClientApp's exception text to the aggregator, and an exception can name a
    file, a DICOM tag or a value (a blocked reply names what it blocked). The site logs the
    details; the aggregator learns the failure's kind. A budget refusal is sent as it is: it
    holds only the site's name and epsilons.
    """

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except BudgetRefused:
            raise
        except Exception as exc:
            name = str(context.node_config.get("site-name", "")) or "this site"
            log.error("%s failed at %s: %s", stage, name, exc, exc_info=True)
            raise SiteFailure(
                f"site {name}: {stage} failed ({type(exc).__name__}); the details stay in the "
                "site's own log"
            ) from None

    return run


def make_client_app(sites: Sequence[SiteRef] | None = None) -> ClientApp:
    """Build the ClientApp; `sites` maps simulation partition-ids to site folders."""
    app = ClientApp()

    @app.train()
    @functools.partial(_contained, "train")
    def train(msg: Message, context: Context) -> Message:
        cfg = RunConfig.from_mapping(msg.content.config_records["config"], strict=False)
        site = resolve_site(context, cfg, sites)
        pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels)
        images, labels = _labelled(_site_data(site, pre, cfg.seed), "train")
        if len(labels) == 0:
            raise ValueError(f"site {site.name} has no readable labelled training images")
        _check_labels(labels, cfg, site)
        device = resolve_device(cfg.device)
        model = build_model(
            cfg.model, in_channels=cfg.channels, num_classes=cfg.num_classes,
            image_size=cfg.image_size,
        )
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        config = msg.content.config_records["config"]
        mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]  # FedProx sends it
        settings = LocalTraining(
            epochs=cfg.local_epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
            lr=cfg.lr, momentum=cfg.momentum, proximal_mu=mu,
        )
        server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
        metrics: dict[str, MetricRecordValues] = {}
        spent: float | None = None
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
        budget, ledger_dir = _budget(context, cfg)
        ledger = PrivacyLedger(site.data_dir, ledger_dir)
        if budget is not None and not cfg.dp:
            raise BudgetRefused(
                f"{REFUSAL_MARK}: site {site.name} has a privacy budget (epsilon {budget:g}) and "
                "this run trains without differential privacy; run with --dp"
            )
        if cfg.dp:
            run_key = cfg.run_key or str(context.run_id)
            privacy = _load_or_plan_privacy(site, cfg, run_key, len(labels))
            per_epoch = batches_per_epoch(len(labels), cfg.batch_size)
            rounds_left = max(1, cfg.rounds - server_round + 1)
            privacy.ensure_room(rounds_left * cfg.local_epochs * per_epoch)
            if budget is not None:
                this_round = (privacy.noise_multiplier, privacy.sample_rate,
                              cfg.local_epochs * per_epoch)
                ledger.check_round(
                    run=run_key, history_after=[*privacy.history, this_round], budget=budget,
                    site=site.name,
                )
            report = train_local_dp(
                model, images, labels, settings=settings, device=device, privacy=privacy,
                proximal=mu > 0,
            )
            privacy.save(_privacy_path(site, run_key))
            ledger.commit(run=run_key, history=privacy.history, budget=budget)
            summary = privacy.summary()
            spent = float(summary["epsilon"])
            metrics["epsilon"] = spent
            privacy_record: dict[str, ConfigRecordValues] = dict(summary)
            records["privacy"] = ConfigRecord(privacy_record)
        else:
            report = train_local(
                model, images, labels, settings=settings, device=device,
                seed=cfg.seed * 1000 + server_round, proximal=mu > 0,
            )
        metrics.update(
            {
                "train-loss": report.loss,
                "num-examples": report.num_examples,
                "train-seconds": report.seconds,
                "steps": report.steps,
            }
        )
        progress.record(
            site.state_dir,
            progress.Progress(
                run=cfg.run_key or str(context.run_id), round=server_round, phase="train",
                seconds=report.seconds, loss=report.loss, examples=report.num_examples,
                epsilon=spent,
                target_epsilon=cfg.target_epsilon if cfg.dp else None,
            ),
        )
        records["arrays"] = ArrayRecord(model.cpu().state_dict())
        records["metrics"] = MetricRecord(metrics)
        records["site"] = ConfigRecord({"name": site.name})
        content = _leave(
            site, RecordDict(records), run=cfg.run_key or str(context.run_id),
            server_round=server_round, message_type="train",
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    @functools.partial(_contained, "evaluate")
    def evaluate_global(msg: Message, context: Context) -> Message:
        cfg = RunConfig.from_mapping(msg.content.config_records["config"], strict=False)
        site = resolve_site(context, cfg, sites)
        pre = Preprocess(image_size=cfg.image_size, channels=cfg.channels)
        images, labels = _labelled(_site_data(site, pre, cfg.seed), "val")
        if len(labels) == 0:
            raise ValueError(f"site {site.name} has no readable labelled validation images")
        _check_labels(labels, cfg, site)
        model = build_model(
            cfg.model, in_channels=cfg.channels, num_classes=cfg.num_classes,
            image_size=cfg.image_size,
        )
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        config = msg.content.config_records["config"]
        started = time.perf_counter()
        result = evaluate(model, images, labels, device=resolve_device(cfg.device))
        progress.record(
            site.state_dir,
            progress.Progress(
                run=cfg.run_key or str(context.run_id),
                round=int(config.get("server-round", 0)),  # type: ignore[arg-type]
                phase="evaluate", seconds=time.perf_counter() - started,
                loss=float(result.get("loss", float("nan"))), examples=len(labels),
            ),
        )
        values: dict[str, MetricRecordValues] = {**result, "num-examples": len(labels)}
        result_record = MetricRecord(values)
        content = RecordDict(
            {"metrics": result_record, "site": ConfigRecord({"name": site.name})}
        )
        content = _leave(
            site, content, run=cfg.run_key or str(context.run_id),
            server_round=int(config.get("server-round", 0)),  # type: ignore[arg-type]
            message_type="evaluate",
        )
        return Message(content, reply_to=msg)

    return app


# Entry point for `flwr run .` and deployed SuperNodes ([tool.flwr.app.components]).
app = make_client_app()
