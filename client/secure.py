"""Client mods for secure aggregation and central DP, around medfed's Message-API handlers.

- `legacy_mod` lets the site take part in a SecAgg+ run. Flower 1.41 runs SecAgg+ on its legacy
  messages (FitIns/FitRes, EvaluateIns/EvaluateRes); this mod translates them to and from the
  Message-API records medfed's `train` and `evaluate` handlers speak, and hands training messages
  to Flower's own `secaggplus_mod`, which masks the update before anything leaves.
- `central_clipping_mod` applies Flower's client-side clipping mod when the aggregator's central
  DP wrapper asks for it (the clipping norm in the config), and stays out of the way otherwise.

Both act only on messages that ask for them, so the same ClientApp serves every kind of run.
"""

from __future__ import annotations

from collections import OrderedDict

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT

from common.privacy import UNIT_WEIGHT
from common.secure import ARRAY_NAMES, PRIVACY_PREFIX, SITE_NAME

_FIT = "fitins.parameters"
_EVALUATE = "evaluateins.parameters"


def is_secure_stage(msg: Message) -> bool:
    """A SecAgg+ protocol message (keys, shares, masked vectors), not plain training."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def legacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Serve Flower's legacy (workflow API) messages with the Message-API handlers."""
    arrays = msg.content.array_records
    if is_secure_stage(msg):
        return secaggplus_mod(msg, context, _as_message_api(call_next))
    if _FIT in arrays or _EVALUATE in arrays:
        return _as_message_api(call_next)(msg, context)
    return call_next(msg, context)


def _as_message_api(call_next: ClientAppCallable) -> ClientAppCallable:
    def translated(msg: Message, context: Context) -> Message:
        evaluating = msg.metadata.message_type == MessageType.EVALUATE
        ins = (
            compat.recorddict_to_evaluateins(msg.content, keep_input=True) if evaluating
            else compat.recorddict_to_fitins(msg.content, keep_input=True)
        )
        config: dict[str, ConfigRecordValues] = dict(ins.config)
        names = str(config.pop(ARRAY_NAMES, "")).split(",")
        values = parameters_to_ndarrays(ins.parameters)
        if len(names) != len(values):
            raise ValueError(
                f"the aggregator sent {len(values)} arrays and {len(names)} names; "
                "site and aggregator run different medfed versions"
            )
        legacy = msg.content
        msg.content = RecordDict({
            "arrays": ArrayRecord(
                OrderedDict((n, Array(v)) for n, v in zip(names, values, strict=True))
            ),
            "config": ConfigRecord(config),
        })
        try:
            reply = call_next(msg, context)
        finally:
            msg.content = legacy
        if reply.has_error():
            return reply
        max_weight = float(config.get("secagg-max-weight", 1000.0))  # type: ignore[arg-type]
        reply.content = (
            _evaluate_res(reply.content) if evaluating
            else _fit_res(reply.content, names, max_weight)
        )
        return reply

    return translated


def _flat_metrics(content: RecordDict) -> dict[str, Scalar]:
    metrics: dict[str, Scalar] = {
        k: v for k, v in content.metric_records["metrics"].items() if not isinstance(v, list)
    }
    metrics[SITE_NAME] = str(content.config_records["site"]["name"])
    privacy = content.config_records.get("privacy")
    for key, value in (privacy or {}).items():
        if not isinstance(value, list | bytes):
            metrics[PRIVACY_PREFIX + key] = value
    return metrics


def _fit_res(content: RecordDict, names: list[str], max_weight: float) -> RecordDict:
    arrays = content.array_records["arrays"]
    metrics = _flat_metrics(content)
    # SecAgg+ weighs each site by num_examples / max_weight (above 1 its masked sum can
    # overflow); under central DP every site weighs the same
    weight = metrics.get(UNIT_WEIGHT, metrics["num-examples"])
    res = FitRes(
        status=Status(Code.OK, ""),
        parameters=ndarrays_to_parameters([arrays[name].numpy() for name in names]),
        num_examples=int(min(float(weight), max_weight)),
        metrics=metrics,
    )
    return compat.fitres_to_recorddict(res, keep_input=False)


def _evaluate_res(content: RecordDict) -> RecordDict:
    metrics = _flat_metrics(content)
    res = EvaluateRes(
        status=Status(Code.OK, ""),
        loss=float(metrics.get("loss", float("nan"))),
        num_examples=int(metrics["num-examples"]),
        metrics=metrics,
    )
    return compat.evaluateres_to_recorddict(res)


def central_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping when the aggregator's central DP wrapper asks for it."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    config = msg.content.config_records.get("config")
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    adaptive = str(config.get("central-dp", "")).endswith("adaptive")
    return (adaptiveclipping_mod if adaptive else fixedclipping_mod)(msg, context, call_next)


# the adaptive mod's reply metric: whether this site's update was clipped (one bit)
NORM_BIT = KEY_NORM_BIT
# what a site's SecAgg+ replies carry: its public keys, the shares it encrypted for its
# neighbours, its masked vector, and the shares it returns to unmask the sum
SECAGG_REPLY_KEYS = frozenset({
    Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST,
    Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST,
})
