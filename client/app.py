"""The ClientApp that runs inside a hospital: trains and evaluates the global model on local images.

What leaves the site in a reply: the model's arrays, scalar metrics (loss, AUC, dataset sizes,
epsilon), the site's name and its DP accounting parameters; before a segmentation run, the
data fingerprint's aggregates (client.fingerprint). No image, header, path or identifier.

Where the site's data is:
- `medfed simulate`: the sites are handed to `make_client_app`, indexed by Flower's partition-id.
- deployment (`flwr-supernode --node-config "data-path=... site-name=... state-dir=..."`).
- `flwr run .` on a local simulation: `sites-dir` from the run config, indexed by partition-id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client import progress
from client.fingerprint import site_fingerprint
from client.ledger import BudgetRefused, PrivacyLedger
from client.outbound import _outbound_mod
from client.policy import check_deployed_message
from client.secure import central_clipping_mod, legacy_mod
from client.site import resolve_site
from client.site_privacy import (
    _budget,
    _load_or_plan_privacy,
    _privacy_path,
    _privacy_record,
    _private_class_counts,
    _shared_histograms,
)
from common import logs
from common.config import RunConfig
from common.cross_site import REPLY_RECORD, REPLY_SPLIT, SPLIT_KEY
from common.cross_site import SPLITS as EVALUATION_SPLITS
from common.evaluation import INCOMING_KEY, INCOMING_RECORD
from common.fingerprint import FINGERPRINT
from common.operating import HIST_KEYS
from common.privacy import REFUSAL_MARK, UNIT_WEIGHT, PrivacyState
from common.scaffold import split_control, with_control
from common.sites import SiteRef
from common.training.loop import LocalTraining, resolve_device
from common.training.scaffold import DriftCorrection, control_path, load_control, save_control
from common.training.tasks import Fit, SplitLoader, get_task
from common.training.tasks.base import load_labelled, network, preprocess, site_data
from common.training.tasks.classify import Scored

log = logging.getLogger("medfed.client")


def _drift_correction(
    cfg: RunConfig, site: SiteRef, run_key: str, control: Mapping[str, torch.Tensor]
) -> DriftCorrection | None:
    """SCAFFOLD's correction for this round (c from the message, c_i from the site's state)."""
    if cfg.strategy != "scaffold":
        return None
    if not control:
        raise ValueError(
            f"site {site.name}: --strategy scaffold but the aggregator sent no control variate; "
            "the server and this site run different medfed versions"
        )
    server = {k: v.numpy() for k, v in control.items()}
    return DriftCorrection(server, load_control(control_path(site.state_dir, run_key)))


def _score(
    context: Context, cfg: RunConfig, site: SiteRef, load: SplitLoader,
    state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, split: str,
    server_round: int, histograms: bool,
) -> tuple[dict[str, MetricRecordValues], str, bool]:
    """Score a global model on this site's `split`; the metrics, the split scored, a release.

    `split` is val, or test (val is scored where the site has no test rows). `histograms`: a
    binary classifier's validation-score histograms go with the metrics (exact without DP;
    under DP once per run, in its final round, accounted); the returned flag says whether that
    DP release was made now.
    """
    task = get_task(cfg.task)
    samples = task.load(site, cfg, split, load)
    if split == "test" and len(samples[0]) == 0:  # no test rows here: say val was scored
        split = "val"
        samples = task.load(site, cfg, split, load)
    n = len(samples[0])
    if n == 0:
        raise ValueError(f"site {site.name} has no readable validation images for --task "
                         f"{cfg.task}")
    model = network(task, cfg, state)
    started = time.perf_counter()
    scores = None
    if isinstance(task, Scored):
        # the operating point the aggregator chose on the last round's histograms
        given = config.get("threshold")
        threshold = float(given) if isinstance(given, int | float) else None
        result, scores = task.evaluate_scored(
            model, samples, cfg, resolve_device(cfg.device), threshold=threshold
        )
    else:
        result = task.evaluate(model, samples, cfg, resolve_device(cfg.device))
    seconds = time.perf_counter() - started
    progress.record(
        site.state_dir,
        progress.Progress(
            run=cfg.run_key or str(context.run_id), round=server_round, phase="evaluate",
            seconds=seconds, loss=float(result.get("loss", float("nan"))), examples=n,
        ),
    )
    log.info(
        "site %s, run %s, round %d, %s evaluate: %d images, %s, %.1fs",
        site.name, cfg.run_key or context.run_id, server_round, cfg.task, n,
        ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(result.items())), seconds,
    )
    values: dict[str, MetricRecordValues] = {**result, "num-examples": n}
    released = False
    if scores is not None and histograms and not cfg.secure_agg:  # SecAgg+: no histogram
        shared, val_epsilon = _shared_histograms(
            context, cfg, site, scores, server_round, task.releases(cfg)
        )
        released = val_epsilon is not None
        if shared is not None:
            values.update({key: [float(v) for v in row]
                           for key, row in zip(HIST_KEYS, shared, strict=True)})
    if cfg.central_dp != "off":
        values[UNIT_WEIGHT] = 1
    return values, split, released


def make_client_app(
    sites: Sequence[SiteRef] | None = None,
    *,
    data: SplitLoader | None = None,
    mods: Sequence[Mod] = (),
    outer_mods: Sequence[Mod] = (),
) -> ClientApp:
    """Build the ClientApp; `sites` maps simulation partition-ids to site folders.

    Args:
        data: how a site's samples are read (default `load_labelled`, its folder); a
            simulation passes virtual sites' loader here.
        mods: Flower client mods around every handler, inside the outbound guard (a
            simulation's tampered updates).
        outer_mods: mods around the whole site, guard included (a simulation's outages: their
            errors reach the aggregator as raised).

    """
    # Outermost first: every reply passes the guard and the audit trail on its way out, and
    # every failure leaves as its kind only; SecAgg+ masks what the handlers (and any
    # simulation mods) produced; Flower's clipping mod clips an honest site's update.
    app = ClientApp(
        mods=[*outer_mods, _outbound_mod(sites), legacy_mod, *mods, central_clipping_mod]
    )
    load = data or load_labelled

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        logs.configure()  # this process may be a fresh ClientApp process or a Ray worker
        check_deployed_message(context, msg.content.config_records["config"])
        cfg = RunConfig.from_mapping(msg.content.config_records["config"], strict=False)
        site = resolve_site(context, cfg, sites)
        task = get_task(cfg.task)
        samples = task.load(site, cfg, "train", load)
        n = len(samples[0])
        if n == 0:
            raise ValueError(f"site {site.name} has no readable training images for --task "
                             f"{cfg.task}")
        device = resolve_device(cfg.device)
        state, control = split_control(msg.content.array_records["arrays"].to_torch_state_dict())
        config = msg.content.config_records["config"]
        # one message per round: the global model that arrived is the last round's, which had
        # no evaluation message; it is scored here first (server.federation's schedule)
        incoming = config.get(INCOMING_KEY)
        scored: dict[str, MetricRecordValues] | None = None
        if isinstance(incoming, int) and not cfg.secure_agg:
            try:
                scored, _, _ = _score(context, cfg, site, load, state, config, split="val",
                                      server_round=incoming, histograms=True)
            except ValueError as exc:  # no validation images: the round still trains
                log.warning("site %s: round %d's model not scored (%s)", site.name, incoming,
                            exc)
        model = network(task, cfg, state)
        run_key = cfg.run_key or str(context.run_id)
        drift = _drift_correction(cfg, site, run_key, control)
        mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]  # FedProx sends it
        settings = LocalTraining(
            epochs=cfg.local_epochs, steps=0 if cfg.local_epochs else cfg.local_steps,
            batch_size=cfg.batch_size, optimizer=cfg.optimizer,
            lr=cfg.lr, momentum=cfg.momentum, proximal_mu=mu,
        )
        server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
        metrics: dict[str, MetricRecordValues] = {}
        spent: float | None = None
        records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
        budget, ledger_dir = _budget(context, cfg)
        if budget is not None and not cfg.dp:
            raise BudgetRefused(
                f"{REFUSAL_MARK}: site {site.name} has a privacy budget (epsilon {budget:g}) and "
                "this run trains without differential privacy; run with --dp"
            )
        # the images this round trains on, by content: copies of them share their spend
        ledger = PrivacyLedger(site.data_dir, ledger_dir, subset=site.subset, split="train",
                               seed=cfg.seed)
        if cfg.dp:
            privacy = _load_or_plan_privacy(site, cfg, run_key, n)
            per_round = cfg.steps_per_round(n)
            rounds_left = max(1, cfg.rounds - server_round + 1)
            privacy.ensure_room(rounds_left * per_round)
            # checked and recorded under one lock before training, kept if training fails
            ledger.reserve_round(
                run=run_key, site=site.name, budget=budget, history=privacy.history,
                this_round=(privacy.noise_multiplier, privacy.sample_rate,
                            per_round),
            )
            class_counts = _private_class_counts(context, cfg, site, task, load)
            report = task.train(
                model, samples, cfg,
                Fit(settings, device, privacy, seed=cfg.seed * 1000 + server_round,
                    proximal=mu > 0, class_counts=class_counts, hooks=drift),
            )
            privacy.save(_privacy_path(site, run_key))
            ledger.commit(run=run_key, site=site.name, history=privacy.history)
            records["privacy"] = _privacy_record(privacy, site, run_key)
            spent = float(privacy.summary()["epsilon"])
            metrics["epsilon"] = spent
        else:
            ledger.record_unbounded(run=run_key, site=site.name)  # no DP: no bound on the spend
            report = task.train(
                model, samples, cfg,
                Fit(settings, device, None, seed=cfg.seed * 1000 + server_round,
                    proximal=mu > 0, hooks=drift),
            )
        metrics.update(report.extra)
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
        log.info(
            "site %s, run %s, round %d, %s train: %d steps on %d images, loss %.4f, %s, %.1fs",
            site.name, cfg.run_key or context.run_id, server_round, cfg.task, report.steps,
            report.num_examples, report.loss,
            f"epsilon {spent:.2f} of {cfg.target_epsilon:g}" if spent is not None else "no DP",
            report.seconds,
        )
        if cfg.central_dp != "off":
            metrics[UNIT_WEIGHT] = 1
        trained = model.cpu().state_dict()
        if drift is not None:
            new_control, change = drift.updated()
            save_control(control_path(site.state_dir, run_key), new_control)
            trained = with_control(trained, {k: torch.from_numpy(v) for k, v in change.items()})
        records["arrays"] = ArrayRecord(trained)
        records["metrics"] = MetricRecord(metrics)
        if scored is not None:
            records[INCOMING_RECORD] = MetricRecord(scored)
        records["site"] = ConfigRecord({"name": site.name})
        return Message(RecordDict(records), reply_to=msg)

    @app.query(FINGERPRINT)
    def fingerprint(msg: Message, context: Context) -> Message:
        logs.configure()
        check_deployed_message(context, msg.content.config_records["config"])
        cfg = RunConfig.from_mapping(msg.content.config_records["config"], strict=False)
        site = resolve_site(context, cfg, sites)
        if cfg.task != "segment":
            raise ValueError(f"site {site.name}: a data fingerprint is measured for --task "
                             f"segment, not {cfg.task}")
        budget, ledger_dir = _budget(context, cfg)
        data = site_data(site, preprocess(cfg), cfg.seed, masks=True)
        found = site_fingerprint(data, site, cfg, cfg.run_key or str(context.run_id),
                                 budget=budget, ledger_dir=ledger_dir)
        log.info("site %s: fingerprint of %d training and %d validation images with masks "
                 "sent", site.name, found.train_images, found.val_images)
        metrics: dict[str, MetricRecordValues] = dict(found.to_metrics())
        return Message(
            RecordDict({"metrics": MetricRecord(metrics),
                        "site": ConfigRecord({"name": site.name})}),
            reply_to=msg,
        )

    @app.evaluate()
    def evaluate_global(msg: Message, context: Context) -> Message:
        logs.configure()
        check_deployed_message(context, msg.content.config_records["config"])
        cfg = RunConfig.from_mapping(msg.content.config_records["config"], strict=False)
        site = resolve_site(context, cfg, sites)
        config = msg.content.config_records["config"]
        # the run's end asks for the held-out test split (server.cross_site); rounds for val
        asked = config.get(SPLIT_KEY)
        split = "val" if asked is None else str(asked)
        if split not in EVALUATION_SPLITS:
            raise ValueError(f"site {site.name}: the aggregator asked to evaluate split "
                             f"{split!r}; a site evaluates {' or '.join(EVALUATION_SPLITS)}")
        server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
        # the cross-site evaluation sends the scalars each round's evaluation sends, and no
        # histogram: under DP they are one accounted release of the validation split per run,
        # and a test split's would be a release no budget planned
        values, split, released = _score(
            context, cfg, site, load, msg.content.array_records["arrays"].to_torch_state_dict(),
            config, split=split, server_round=server_round, histograms=asked is None,
        )
        content = RecordDict(
            {"metrics": MetricRecord(values), "site": ConfigRecord({"name": site.name})}
        )
        if asked is not None:
            content[REPLY_RECORD] = ConfigRecord({REPLY_SPLIT: split})
        run_key = cfg.run_key or str(context.run_id)
        if released and _privacy_path(site, run_key).is_file():
            # the validation split's new spend, beside the training's (results.json privacy)
            content["privacy"] = _privacy_record(
                PrivacyState.load(_privacy_path(site, run_key)), site, run_key
            )
        return Message(content, reply_to=msg)

    return app


# Entry point for `flwr run .` and deployed SuperNodes ([tool.flwr.app.components]).
app = make_client_app()
