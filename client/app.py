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

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
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
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client import progress, validation
from client.audit import DEFAULT_CONFIGS, DEFAULT_METRICS, OutboundGuard, describe_reply
from client.audit_state import TRAIL, append_signed, signing_key
from client.fingerprint import site_fingerprint
from client.ledger import BudgetRefused, PrivacyLedger
from client.policy import RunRefused, check_deployed_message
from client.secure import (
    NORM_BIT,
    SECAGG_REPLY_KEYS,
    central_clipping_mod,
    is_secure_stage,
    legacy_mod,
)
from common import logs
from common.audit_head import HEAD_RECORD, RECORD_KEYS, head_metrics
from common.config import RunConfig, check_budget
from common.cross_site import REPLY_RECORD, REPLY_SPLIT, SPLIT_KEY
from common.cross_site import SPLITS as EVALUATION_SPLITS
from common.fingerprint import FINGERPRINT
from common.fingerprint import LIST_KEYS as FINGERPRINT_LISTS
from common.fingerprint import SCALAR_KEYS as FINGERPRINT_SCALARS
from common.operating import HIST_KEYS, RELEASE
from common.privacy import (
    REFUSAL_MARK,
    UNIT_WEIGHT,
    VALIDATION_EPSILON,
    PrivacyBudgetSpent,
    PrivacyState,
)
from common.scaffold import split_control, with_control
from common.secure import PRIVACY_PREFIX, SITE_NAME
from common.sites import SiteRef, discover_sites
from common.training.loop import LocalTraining, resolve_device
from common.training.scaffold import DriftCorrection, control_path, load_control, save_control
from common.training.tasks import TASKS, Fit, SplitLoader, get_task
from common.training.tasks.base import Task, load_labelled, network, preprocess, site_data
from common.training.tasks.classify import CLASS_COUNTS, Scored

log = logging.getLogger("medfed.client")

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


def _privacy_path(site: SiteRef, run_key: str) -> Path:
    return site.state_dir / "privacy" / f"{run_key}.json"


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


# What may leave the site in a reply (client.audit); an AUC is NaN on a one-class validation split.
_TASK_METRICS: frozenset[str] = frozenset().union(*(t.metrics for t in TASKS.values()))
_METRICS = DEFAULT_METRICS | {UNIT_WEIGHT, NORM_BIT} | _TASK_METRICS
# SecAgg+ replies are Flower's legacy FitRes/EvaluateRes: the same metrics, flattened (with the
# site's name and its privacy report), plus the protocol's keys, shares and masked vectors.
_LEGACY_METRICS = (
    _METRICS | {SITE_NAME} | {PRIVACY_PREFIX + key for key in DEFAULT_CONFIGS["privacy"]}
)
GUARD = OutboundGuard(
    _METRICS | {"num_examples"} | set(HIST_KEYS) | set(FINGERPRINT_SCALARS)
    | set(FINGERPRINT_LISTS),
    {
        **DEFAULT_CONFIGS,
        "fitres.metrics": _LEGACY_METRICS, "evaluateres.metrics": _LEGACY_METRICS,
        "fitres.status": frozenset({"code", "message"}),
        "evaluateres.status": frozenset({"code", "message"}),
        REPLY_RECORD: frozenset({REPLY_SPLIT}),  # the split a cross-site evaluation scored
    },
    allow_nan=True,
    opaque_configs={RECORD_KEY_CONFIGS: SECAGG_REPLY_KEYS, HEAD_RECORD: RECORD_KEYS},
    # counts per score bin (common.operating) and summed class shares (client.fingerprint):
    # aggregates over images, never one per image
    list_metrics=frozenset(HIST_KEYS) | frozenset(FINGERPRINT_LISTS),
)
AUDIT_FILE = TRAIL
_LEGACY_METRIC_RECORDS = frozenset({"fitres.metrics", "evaluateres.metrics"})


class SiteFailure(RuntimeError):
    """What the aggregator is told when the site fails: the kind of failure, no details."""


def _reply_config(msg: Message, context: Context) -> RunConfig:
    """The run config a message carries (Message API or legacy), else the app's run config."""
    records = msg.content.config_records
    values = records.get("config") or records.get("fitins.config") or records.get(
        "evaluateins.config"
    )
    return RunConfig.from_mapping(values if values is not None else context.run_config,
                                  strict=False)


def _message_type(msg: Message) -> str:
    message_type = msg.metadata.message_type
    kind = "train" if message_type == MessageType.TRAIN else "evaluate"
    if message_type.startswith(MessageType.QUERY):
        kind = message_type
    if is_secure_stage(msg):
        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get("stage", "")
        kind = f"train/secagg-{stage!s}"
    return kind


def _round_of(msg: Message) -> int:
    """The server round: from the config, else the group id the workflow API sets."""
    config = msg.content.config_records.get("config")
    value = config.get("server-round") if config is not None else None
    if isinstance(value, int | float):
        return int(value)
    return int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else 0


SITE_LOG = "site.log"


@contextmanager
def _site_log(site: SiteRef) -> Iterator[None]:
    """A simulated site's medfed log in its state folder (RUN_DIR/site-state/<site>/site.log).

    A deployed site logs where its `medfed site` process does; a virtual site runs in one of
    Ray's workers, whose output the user never sees, so each message's log goes to the site's
    own file while the worker handles it.
    """
    logger = logging.getLogger("medfed")
    site.state_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(site.state_dir / SITE_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
        handler.close()


def _outbound_mod(sites: Sequence[SiteRef] | None) -> Mod:
    """Guard and audit every reply that leaves the site; keep failures' details at the site.

    Flower sends a ClientApp's exception text to the aggregator, and an exception can name a
    file, a DICOM tag or a value (a blocked reply names what it blocked). The site logs the
    details; the aggregator learns the failure's kind. A simulated site (no `data-path` in
    its node config) is on the user's own machine: the reason goes with the kind, and its log
    is RUN_DIR/site-state/<site>/site.log. A budget refusal is sent as it is: it holds only the
    site's name and epsilons. Audited here, outside SecAgg+, the trail holds
    what really left: the masked vectors and key shares, never the unmasked update.

    Order, so that the aggregator witnesses a head that includes the reply it comes with: the
    guard checks the reply; its entry (with the SHA-256 of the whole reply) is appended and the
    new head signed (client.audit_state); then the head is attached as the `audit-head`
    record (and, in a legacy SecAgg+ reply, copied into its metrics as `audit-head-*`). The
    entry cannot hash its own head, so an entry's `payload_sha256` covers the reply without
    them, and the head the reply carries is the hash of the entry that describes that reply.
    The site's key is its kit's (`audit-key` in the node config, `medfed site`); a site without
    one (a simulation) makes its own in its state.
    """

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
            ) -> Message:
        kind = _message_type(msg)  # before SecAgg+ consumes its stage
        cfg = _reply_config(msg, context)
        server_round = _round_of(msg)
        run = cfg.run_key or str(context.run_id)
        name = str(context.node_config.get("site-name", "")) or "this site"
        simulated = "data-path" not in context.node_config
        site: SiteRef | None = None
        try:
            site = resolve_site(context, cfg, sites)
            name = site.name
            with _site_log(site) if simulated else contextlib.nullcontext():
                try:
                    reply = call_next(msg, context)
                    GUARD.check(reply.content)
                    key_path = str(context.node_config.get("audit-key", "") or "")
                    head = append_signed(
                        site.state_dir,
                        describe_reply(reply.content, run=run, round=server_round,
                                       message_type=kind),
                        key=signing_key(site.state_dir, Path(key_path) if key_path else None),
                    )
                    witnessed = RecordDict({HEAD_RECORD: head.to_record()})
                    GUARD.check(witnessed)
                    reply.content[HEAD_RECORD] = witnessed[HEAD_RECORD]
                    for legacy in _LEGACY_METRIC_RECORDS & set(reply.content.config_records):
                        # Flower's SecAgg+ workflow reads a legacy reply's metrics only
                        reply.content.config_records[legacy].update(
                            head_metrics(head.to_record())
                        )
                    return reply
                except PrivacyBudgetSpent as exc:  # the run's own target: policy, as a budget
                    log.warning("round %d: %s refused: %s", server_round, kind, exc)
                    raise BudgetRefused(f"{REFUSAL_MARK}: site {name} {exc}") from None
                except BudgetRefused as exc:
                    log.warning("round %d: %s refused: %s", server_round, kind, exc)
                    raise
                except Exception as exc:
                    log.error("round %d: %s failed at %s: %s", server_round, kind, name, exc,
                              exc_info=True)
                    raise
        except (BudgetRefused, RunRefused):  # policy: the text is meant for the aggregator
            raise
        except Exception as exc:
            if site is None:  # not logged above: the site could not be resolved
                log.error("%s failed at %s: %s", kind, name, exc, exc_info=True)
            if simulated:  # the user's own machine: the reason, and where the log is
                where = f"; log: {site.state_dir / SITE_LOG}" if site is not None else ""
                raise SiteFailure(
                    f"site {name}: {kind} failed ({type(exc).__name__}: {exc}){where}"
                ) from None
            raise SiteFailure(
                f"site {name}: {kind} failed ({type(exc).__name__}); the details stay in the "
                "site's own log"
            ) from None

    return mod


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
        model = network(task, cfg, state)
        run_key = cfg.run_key or str(context.run_id)
        drift = _drift_correction(cfg, site, run_key, control)
        config = msg.content.config_records["config"]
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
        task = get_task(cfg.task)
        config = msg.content.config_records["config"]
        # the run's end asks for the held-out test split (server.cross_site); rounds for val
        asked = config.get(SPLIT_KEY)
        split = "val" if asked is None else str(asked)
        if split not in EVALUATION_SPLITS:
            raise ValueError(f"site {site.name}: the aggregator asked to evaluate split "
                             f"{split!r}; a site evaluates {' or '.join(EVALUATION_SPLITS)}")
        samples = task.load(site, cfg, split, load)
        if split == "test" and len(samples[0]) == 0:  # no test rows here: say val was scored
            split = "val"
            samples = task.load(site, cfg, split, load)
        n = len(samples[0])
        if n == 0:
            raise ValueError(f"site {site.name} has no readable validation images for --task "
                             f"{cfg.task}")
        model = network(task, cfg, msg.content.array_records["arrays"].to_torch_state_dict())
        server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
        started = time.perf_counter()
        histograms = None
        if isinstance(task, Scored):
            # the operating point the aggregator chose on the last round's histograms
            given = config.get("threshold")
            threshold = float(given) if isinstance(given, int | float) else None
            result, histograms = task.evaluate_scored(
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
        if cfg.secure_agg:  # its legacy replies carry scalars only (client.secure): spend nothing
            histograms = None
        if asked is not None:
            # the cross-site evaluation sends the scalars each round's evaluation sends, and no
            # histogram: under DP they are one accounted release of the validation split per
            # run, and a test split's would be a release no budget planned
            histograms = None
        if histograms is not None:
            shared, val_epsilon = _shared_histograms(
                context, cfg, site, histograms, server_round, task.releases(cfg)
            )
            released = val_epsilon is not None
            if shared is not None:
                values.update({key: [float(v) for v in row]
                               for key, row in zip(HIST_KEYS, shared, strict=True)})
        if cfg.central_dp != "off":
            values[UNIT_WEIGHT] = 1
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
