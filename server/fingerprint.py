"""Before a segmentation run: every connected site's data fingerprint, and the run planned on it.

One Flower query ("query.fingerprint") to every node the grid knows, answered by the sites'
ClientApp (client.fingerprint) with aggregates only. A site that fails or does not answer is
left out of the plan (its failure is logged); with no answer at all the run keeps its settings
and the sites' own checks say what is wrong when round 1 starts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from common.config import RunConfig
from common.fingerprint import FINGERPRINT, Fingerprint
from common.seg_plan import plan_run
from server.waiting import wait_for_sites

log = logging.getLogger("medfed.server")


def collect(grid: Grid, cfg: RunConfig) -> tuple[dict[str, Fingerprint], dict[str, str]]:
    """Each answering site's fingerprint by name, and each failure's reason by site or node."""
    config = ConfigRecord({k: v for k, v in cfg.to_mapping().items() if k != "proximal-mu"})
    # the sites the first round would sample: --min-sites of them at least (a simulation's
    # virtual sites register as its engine starts)
    wait_for_sites(grid, min_sites=cfg.min_sites, timeout=cfg.wait_timeout, say=log.info)
    nodes = sorted(grid.get_node_ids())
    log.info("fingerprint: asking %d sites", len(nodes))
    messages = [
        Message(RecordDict({"config": config}), dst_node_id=node,
                message_type=f"{MessageType.QUERY}.{FINGERPRINT}")
        for node in nodes
    ]
    found: dict[str, Fingerprint] = {}
    failed: dict[str, str] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        node = f"node-{reply.metadata.src_node_id}"
        if reply.has_error():
            failed[node] = str(reply.error.reason)
            continue
        site = reply.content.config_records.get("site")
        name = str(site.get("name", node)) if site is not None else node
        try:
            found[name] = Fingerprint.from_metrics(dict(reply.content["metrics"]))
        except (KeyError, TypeError, ValueError) as exc:
            failed[name] = f"unusable fingerprint: {exc}"
    return found, failed


def planned(grid: Grid, cfg: RunConfig) -> tuple[RunConfig, dict[str, Any] | None]:
    """The run's settings after its sites' fingerprints, and the plan for results.json."""
    found, failed = collect(grid, cfg)
    for where, reason in sorted(failed.items()):
        log.warning("fingerprint: %s did not answer: %s", where, reason)
    if not found:
        log.warning("fingerprint: no site answered; the run keeps its settings")
        return cfg, None
    new_cfg, plan = plan_run(cfg, found)
    if failed:
        plan["failed"] = failed
    for key, value in plan["choices"].items():
        log.info("plan: %s %s (%s)", key, value, plan["reasons"].get(key, ""))
    return new_cfg, plan


# the U-Net's output layer (models.unet.UNet.head)
HEAD_BIAS = "head.bias"


def with_class_prior(
    arrays: dict[str, np.ndarray], prior: Sequence[float] | None
) -> dict[str, np.ndarray]:
    """The initial weights with the output layer starting at the planned class shares.

    Softmax of the bias is then the prior at every pixel before training (models.unet's
    `class_prior`); arrays without that layer, or with another class count, are returned as
    they are.
    """
    bias = arrays.get(HEAD_BIAS)
    if prior is None or bias is None or bias.shape != (len(prior),):
        return arrays
    logs = np.array([math.log(p) for p in prior], dtype=bias.dtype)
    return {**arrays, HEAD_BIAS: logs - logs.mean()}
