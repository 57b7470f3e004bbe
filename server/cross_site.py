"""The cross-site matrix: the final global model scored by every site on its own held-out split.

At the end of a run (simulated or deployed, resumed or not) the aggregator sends the final model
once more to every connected site as a Flower evaluate message, so each site's outbound guard,
audit trail, app approval and run policy apply as to any round's evaluation. Its config asks for
the site's `test` split (common.cross_site); a site without test rows scores its `val` split and
says so. Privacy: the reply carries the same scalar metrics each round's evaluation sends, and
no score histogram (under DP those are a once-per-run, accounted release of the validation
split; a test split's would be an unaccounted one), so the run spends no further budget.

medfed keeps one model per run, the final global one: no best-round checkpoint and no
personalised site models, so the matrix is that model x sites (`models: ["final"]`). A site that
fails or does not answer is listed under `failed` with its reason; the run's outcome does not
depend on this evaluation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from common.apps import parse_app_refusal
from common.audit_head import HEAD_RECORD, ChainHead, HeadError
from common.config import RunConfig
from common.cross_site import (
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    REPLY_RECORD,
    REPLY_SPLIT,
    SPLIT_KEY,
)
from common.policy import parse_run_refusal
from common.privacy import parse_refusal
from server.federation import _SITE_IN_REASON, _site_text
from server.operating import THRESHOLD_KEY
from server.record import RunRecord

log = logging.getLogger("medfed.server")

MODELS = ["final"]
NOTE = ("medfed keeps one model per run, the final global one (no best-round checkpoint, no "
        "personalised site models): the matrix is that model scored at each site")


def summarize(sites: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each metric's worst site, mean and spread (max - min) over the sites that define it.

    The worst value is the lowest of a higher-is-better metric (AUC, Dice) and the highest of
    a lower-is-better one (loss, HD95, ECE, Brier; common.cross_site); a metric of neither kind
    has no worst. NaN (undefined at a site: an AUC on one class) is left out, as `fairness`
    does; a metric no site defines is absent.
    """
    names = sorted({k for m in sites.values() for k, v in m.items()
                    if k not in ("split", "num-examples") and isinstance(v, int | float)
                    and not isinstance(v, bool)})
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        values = {site: float(m[name]) for site, m in sites.items()
                  if isinstance(m.get(name), int | float) and math.isfinite(float(m[name]))}
        if not values:
            continue
        entry: dict[str, Any] = {
            "mean": float(np.mean(list(values.values()))),
            "spread": max(values.values()) - min(values.values()),
            "sites": len(values),
        }
        if name in HIGHER_IS_BETTER or name in LOWER_IS_BETTER:
            pick = min if name in HIGHER_IS_BETTER else max
            worst_site = pick(sorted(values), key=lambda s: values[s])
            entry.update(worst=values[worst_site], worst_site=worst_site)
        summary[name] = entry
    return summary


def _config(cfg: RunConfig, record: RunRecord) -> ConfigRecord:
    # the whole run config, as each round's evaluation carries it (a deployed site checks it
    # against the signed one); FedProx's key is the strategy's to send
    values = {k: v for k, v in cfg.to_mapping().items() if k != "proximal-mu"}
    values.update({"server-round": record.last_round, SPLIT_KEY: "test"})
    if record.threshold is not None:  # a binary classifier's rates at its operating point
        values[THRESHOLD_KEY] = float(record.threshold)
    return ConfigRecord(values)


def _failure_reason(reply: Message) -> tuple[str | None, str]:
    """The site a failed reply names, if any, and its reason (a refusal by policy says so)."""
    reason = str(reply.error.reason or f"error code {reply.error.code}")
    refusal = parse_refusal(reason) or parse_app_refusal(reason) or parse_run_refusal(reason)
    if refusal is not None:  # the site's policy (budget, app approval, run check), as rounds
        text, name = refusal
        return name, f"refused: {text}"
    named = _SITE_IN_REASON.search(reason)
    return (named.group(1) if named else None), _site_text(reason)


@dataclass
class Replies:
    """What the sites answered: metrics, failures, and the audit heads their replies carried."""

    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    # each answering site's signed audit-trail head (common.audit_head), as JSON: the
    # aggregator witnesses this reply too (`medfed site audit --witness results.json`)
    audit_heads: dict[str, dict[str, Any]] = field(default_factory=dict)


def _head(record: ConfigRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    try:
        return ChainHead.from_record(record).to_json()
    except HeadError as exc:
        return {"seq": -1, "error": str(exc)}


def read_replies(
    replies: Iterable[Message], nodes: Iterable[int], seen: Iterable[str] = ()
) -> Replies:
    """Each answering site's metrics (with `split`) and audit head, each failure's reason.

    Args:
        nodes: the node ids asked; one that sent no reply is a failure under its id.
        seen: the sites the run heard of; one neither answering nor named by a failure is
            listed as not answering.

    """
    out = Replies()
    sites, failed = out.sites, out.failed
    answered: set[int] = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            name, reason = _failure_reason(reply)
            failed[name or f"node-{node}"] = reason
            continue
        site = reply.content.config_records.get("site")
        name = str(site.get("name", f"node-{node}")) if site is not None else f"node-{node}"
        head = _head(reply.content.config_records.get(HEAD_RECORD))
        if head is not None:
            out.audit_heads[name] = head
        metrics = reply.content.metric_records.get("metrics")
        if metrics is None:
            failed[name] = "the reply carried no metrics"
            continue
        evaluation = reply.content.config_records.get(REPLY_RECORD)
        split = evaluation.get(REPLY_SPLIT) if evaluation is not None else None
        if split is None:  # a site running an older medfed scored its validation split
            split = "val"
        values: dict[str, Any] = {k: float(v) for k, v in metrics.items()
                                  if isinstance(v, int | float) and not isinstance(v, bool)}
        values["num-examples"] = int(values.get("num-examples", 0))
        values["split"] = str(split)
        sites[name] = values
    for node in sorted(set(nodes) - answered):
        failed[f"node-{node}"] = "no reply before the round timeout"
    unnamed = sorted(k for k in failed if k.startswith("node-"))
    for name in sorted(set(seen) - set(sites) - set(failed)):
        failed[name] = (
            "no answer: not connected at the end of the run"
            + (f", or one of {', '.join(unnamed)}" if unnamed else "")
        )
    return out


def cross_site(grid: Grid, cfg: RunConfig, record: RunRecord) -> dict[str, Any]:
    """results.json's `cross_site`: the final model evaluated at every connected site.

    Skipped, with the reason, when no round trained a site (no final model) or no site is
    connected; never raises for a site's failure.
    """
    base: dict[str, Any] = {"model": "final", "models": MODELS, "round": record.last_round,
                            "note": NOTE}
    arrays = record.final_arrays
    if not record.trained or arrays is None:
        return {**base, "skipped": "no round trained a site: there is no final model to "
                "evaluate"}
    nodes = sorted(grid.get_node_ids())
    if not nodes:
        return {**base, "skipped": "no site was connected at the end of the run",
                "failed": {s: "not connected" for s in sorted(record.sites_seen)}}
    content = RecordDict({
        "arrays": ArrayRecord({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}),
        "config": _config(cfg, record),
    })
    messages = [Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
                for node in nodes]
    log.info("cross-site: the final model (round %d) to %d sites, each on its test split",
             record.last_round, len(nodes))
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    got = read_replies(replies, nodes, record.sites_seen)
    for name, reason in sorted(got.failed.items()):
        log.warning("cross-site: %s: %s", name, reason)
    return {**base, "requested_split": "test", "sites": dict(sorted(got.sites.items())),
            "summary": summarize(got.sites), "failed": got.failed,
            "audit_heads": got.audit_heads}
