"""A strategy wrapper that records what each site did in each round, and numbers rounds on resume.

It wraps any Flower strategy (as Flower's DP wrappers do) and delegates every decision to it. What
it adds: per-site train/evaluate metrics and privacy reports, the sites that took part, sites that
failed and why, how many sites were connected, the model bytes sent to and received from each
site, and a round offset so a resumed run continues at round k+1 instead of round 1.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.apps import parse_app_refusal
from common.audit_head import HEAD_RECORD, ChainHead, HeadError
from common.evaluation import INCOMING_KEY, INCOMING_RECORD, evaluation_message_after
from common.operating import HIST_KEYS, histograms_from_metrics
from common.policy import parse_run_refusal
from common.privacy import parse_refusal
from server.operating import OperatingPoints

_SITE_IN_REASON = re.compile(r"\bsite ([A-Za-z0-9][A-Za-z0-9._-]{0,63}): ")


def _site_text(reason: str) -> str:
    """A site's own failure text ("site NAME: ...") cut out of Flower's and Ray's wrapping."""
    named = _SITE_IN_REASON.search(reason)
    if named is None:
        return reason
    return re.split(r"'>|\n", reason[named.start():], maxsplit=1)[0].strip()


@dataclass
class RoundLog:
    """Everything observed in one round, in plain JSON-able values."""

    round: int
    started: float = field(default_factory=time.perf_counter)
    sampled: list[str] = field(default_factory=list)
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[str, dict[str, float]] = field(default_factory=dict)
    train_aggregated: dict[str, float] = field(default_factory=dict)
    evaluate_aggregated: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    connected: int | None = None
    # model bytes per site: "down" the global model sent to it, "up" the update it sent back
    update_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    # each site's latest signed audit-trail head this round (common.audit_head), as JSON
    audit_heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    # each site's validation-score histograms (common.operating; not written to results.json)
    histograms: dict[str, np.ndarray] = field(default_factory=dict)
    # the threshold chosen from them (server.operating), with per-site rates and fairness
    operating_point: dict[str, Any] | None = None

    def witness(self, site: str, record: Mapping[str, Any] | None) -> None:
        """Keep the audit head a reply carries, if it is the site's latest this round."""
        if record is None:
            return
        try:
            head = ChainHead.from_record(record).to_json()
        except HeadError as exc:
            head = {"seq": -1, "error": str(exc)}
        if head["seq"] >= self.audit_heads.get(site, {}).get("seq", -1):
            self.audit_heads[site] = head

    def add_bytes(self, site: str, direction: str, count: int) -> None:
        """Count `count` array bytes sent to (`down`) or received from (`up`) `site`."""
        per_site = self.update_bytes.setdefault(site, {"down": 0, "up": 0})
        per_site[direction] += count

    @property
    def participants(self) -> list[str]:
        """Sites whose training update reached the aggregator this round."""
        return sorted(self.train)


def array_bytes(content: RecordDict) -> int:
    """Bytes of every array a message carries (the model's weights, as serialised by Flower)."""
    return sum(
        len(array.data) for record in content.array_records.values() for array in record.values()
    )


def _scalars(record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if not isinstance(v, list)}


def _take_scores(replies: list[Message]) -> list[Message]:
    """Each training reply's score of the model it started from, as an evaluation reply.

    The score is removed from the training reply: the strategy aggregates one MetricRecord.
    """
    scored = []
    for reply in replies:
        if reply.has_error() or INCOMING_RECORD not in reply.content.metric_records:
            continue
        metrics = reply.content.pop(INCOMING_RECORD)
        site = reply.content.config_records.get("site")
        content = RecordDict({"metrics": metrics})
        if site is not None:
            content["site"] = ConfigRecord(dict(site))
        scored.append(make_message(copy.deepcopy(reply.metadata), content=content))
    return scored


class RecordingStrategy(Strategy):
    """Delegate to `inner`, record each round in `self.rounds` and offset round numbers."""

    def __init__(
        self, inner: Strategy, *, round_offset: int = 0,
        operating: OperatingPoints | None = None, evaluate_every: int = 1, last_round: int = 0,
    ) -> None:
        self.inner = inner
        self.round_offset = round_offset
        # evaluation messages follow every `evaluate_every`-th round and the last (round
        # numbers as the run counts them); the sites score every other round's model at the
        # start of the next round's training message (common.evaluation)
        self.evaluate_every = evaluate_every
        self.last_round = last_round
        self._unscored: int | None = None  # the round whose model the next training scores
        self.late: list[int] = []  # rounds scored since the run loop last asked (take_late)
        # a binary classifier's threshold, chosen after each federated evaluation
        self.operating = operating or OperatingPoints(enabled=False)
        self.rounds: dict[int, RoundLog] = {}
        self._names: dict[int, str] = {}

    def _log(self, server_round: int) -> RoundLog:
        r = server_round + self.round_offset
        if r not in self.rounds:
            self.rounds[r] = RoundLog(round=r)
        return self.rounds[r]

    def _name(self, node_id: int) -> str:
        return self._names.get(node_id, f"node-{node_id}")

    def _read_replies(
        self, log: RoundLog, stage: str, sent: list[Message], replies: list[Message]
    ) -> None:
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                kind = "error"
                refusal = (
                    parse_refusal(reason) or parse_app_refusal(reason)
                    or parse_run_refusal(reason)
                )
                if refusal is not None:  # a site keeping its privacy budget: policy, not a fault
                    kind, (reason, name) = "refused", refusal
                    if name:
                        self._names[node] = name
                elif node not in self._names:
                    # a site failing before it ever answered names itself in the error
                    # ("site NAME: ..."): a simulation's injected fault, a contained failure
                    named = _SITE_IN_REASON.search(reason)
                    if named:
                        self._names[node] = named.group(1)
                if kind == "error":
                    reason = _site_text(reason)
                log.failures.append(
                    {"site": self._name(node), "stage": stage, "kind": kind, "reason": reason}
                )
                continue
            site = msg.content.config_records.get("site")
            name = str(site["name"]) if site is not None else f"node-{node}"
            self._names[node] = name
            log.witness(name, msg.content.config_records.get(HEAD_RECORD))
            log.add_bytes(name, "up", array_bytes(msg.content))
            record = next(iter(msg.content.metric_records.values()), None)
            if record is not None and stage == "evaluate":
                hist = histograms_from_metrics(record)
                if hist is not None:
                    log.histograms[name] = hist
                # consumed here: a site that sent none (its DP release refused) must not make
                # the inner strategy skip aggregating everyone's metrics (keys must match)
                for key in HIST_KEYS:
                    record.pop(key, None)
            metrics = _scalars(record)
            (log.train if stage == "train" else log.evaluate)[name] = metrics
            privacy = msg.content.config_records.get("privacy")
            if privacy is not None:
                log.privacy[name] = dict(privacy)
        for msg in sent:
            # These are the Messages this wrapper handed to the grid, content intact (a grid
            # strips content only from its own copies), so this counts what each site was sent.
            log.add_bytes(self._name(msg.metadata.dst_node_id), "down", array_bytes(msg.content))
            if msg.metadata.dst_node_id not in answered:
                log.failures.append(
                    {
                        "site": self._name(msg.metadata.dst_node_id),
                        "stage": stage,
                        "kind": "timeout",
                        "reason": "no reply before the round timeout",
                    }
                )

    def _move_screened(self, log: RoundLog, inner_round: int) -> None:
        """Updates a screening strategy inside dropped are failures, not participants."""
        rejections = getattr(self.inner, "rejections", {}).get(inner_round, [])
        for rejection in rejections:
            name = self._names.get(rejection.node_id, rejection.site)
            log.train.pop(name, None)
            log.failures.append(
                {
                    "site": name, "stage": "train", "kind": f"screened_{rejection.reason}",
                    "reason": rejection.detail,
                }
            )

    # --- Strategy interface ---------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy sample sites; remember whom it asked."""
        log = self._log(server_round)
        log.started = time.perf_counter()
        log.connected = len(list(grid.get_node_ids()))
        previous = server_round + self.round_offset - 1
        if self._unscored == previous:  # score that model first, at the current threshold
            config = self.operating.config(ConfigRecord({**config, INCOMING_KEY: previous}))
        messages = list(
            self.inner.configure_train(server_round + self.round_offset, arrays, config, grid)
        )
        self._sent_train = messages
        log.sampled = [self._name(m.metadata.dst_node_id) for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record each site's reply before the inner strategy (which may consume them)."""
        replies = list(replies)
        scored = _take_scores(replies)
        if scored and self._unscored == server_round + self.round_offset - 1:
            self._late_evaluation(server_round - 1, scored)
        self._unscored = None
        log = self._log(server_round)
        self._read_replies(log, "train", getattr(self, "_sent_train", []), replies)
        arrays, metrics = self.inner.aggregate_train(server_round + self.round_offset, replies)
        self._move_screened(log, server_round + self.round_offset)
        log.train_aggregated = _scalars(metrics)
        if arrays is None and replies:
            log.failures.append(
                {
                    "site": "*", "stage": "aggregate", "kind": "error",
                    "reason": "no update could be aggregated",
                }
            )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy choose the evaluating sites; send them the threshold.

        No message after a round the schedule leaves to the next training message.
        """
        run_round = server_round + self.round_offset
        if not evaluation_message_after(run_round, every=self.evaluate_every,
                                        last=self.last_round):
            self._unscored = run_round
            self._sent_evaluate = []
            return []
        config = self.operating.config(config)
        messages = list(
            self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid)
        )
        self._sent_evaluate = messages
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record each site's evaluation, then aggregate with the inner strategy."""
        replies = list(replies)
        if self._unscored == server_round + self.round_offset:
            return None  # scored at the start of the next round's training
        return self._evaluated(server_round, replies, getattr(self, "_sent_evaluate", []))

    def _evaluated(self, server_round: int, replies: list[Message], sent: list[Message]
                   ) -> MetricRecord | None:
        log = self._log(server_round)
        self._read_replies(log, "evaluate", sent, replies)
        metrics = self.inner.aggregate_evaluate(server_round + self.round_offset, replies)
        log.evaluate_aggregated = _scalars(metrics)
        log.operating_point = self.operating.choose(log.round, log.histograms)
        return metrics

    def _late_evaluation(self, server_round: int, scored: list[Message]) -> None:
        """The last round's model as the sites scored it at the start of this round."""
        self._evaluated(server_round, scored, [])
        self.late.append(server_round + self.round_offset)

    def take_late(self) -> list[int]:
        """The rounds whose evaluation arrived late since the last call (their entries change)."""
        late, self.late = self.late, []
        return late

    def summary(self) -> None:
        """Log the inner strategy's summary."""
        self.inner.summary()
