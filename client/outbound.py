"""What leaves a site: the outbound guard, the audit trail of each reply, contained failures."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.audit import DEFAULT_CONFIGS, DEFAULT_METRICS, OutboundGuard, describe_reply
from client.audit_state import append_signed, signing_key
from client.failures import SiteFailure, failure_text
from client.ledger import BudgetRefused
from client.policy import RunRefused
from client.secure import NORM_BIT, SECAGG_REPLY_KEYS, is_secure_stage
from client.site import resolve_site
from common.audit_head import HEAD_RECORD, RECORD_KEYS, head_metrics
from common.config import RunConfig
from common.cross_site import REPLY_RECORD, REPLY_SPLIT
from common.fingerprint import LIST_KEYS as FINGERPRINT_LISTS
from common.fingerprint import SCALAR_KEYS as FINGERPRINT_SCALARS
from common.operating import HIST_KEYS
from common.privacy import REFUSAL_MARK, UNIT_WEIGHT, PrivacyBudgetSpent
from common.secure import PRIVACY_PREFIX, SITE_NAME
from common.sites import SiteRef
from common.training.tasks import TASKS

log = logging.getLogger("medfed.client")

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
_LEGACY_METRIC_RECORDS = frozenset({"fitres.metrics", "evaluateres.metrics"})


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
            raise SiteFailure(failure_text(name, kind, type(exc).__name__)) from None

    return mod
