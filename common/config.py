"""A federated run's configuration, parsed once at the boundary and passed down frozen.

The same `RunConfig` comes from `medfed simulate` and `medfed run` flags, from `flwr run .
--run-config` (`context.run_config`, keys in kebab-case as in pyproject's
`[tool.flwr.app.config]`), and from a checkpoint when a run resumes. Every value is validated
here, with the flag that set it named in the error, so nothing deeper in the code needs to
re-check user input.

A setting is declared once, as a field below made by `setting(...)`: its default, its help
text and the commands that offer it as a flag. medfed.options builds both commands' flags from
that, and tests/common/test_config_app.py checks pyproject's app config against it
(`python -m common.app_config --write` rewrites that block from RunConfig).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from common.config_rules import (
    ACCOUNTANTS,
    CENTRAL_DP,
    OPTIMIZERS,
    ConfigError,
    check_budget,
    check_run,
    flag,
    require,
)
from common.registry import (
    MEAN_STRATEGIES,
    MODELS,
    STRATEGIES,
    TASK_MODELS,
    TASKS,
    Strategy,
    Task,
)

# declared in common.registry and common.config_rules; imported from here by most of the code
__all__ = [
    "ACCOUNTANTS", "CENTRAL_DP", "MEAN_STRATEGIES", "MODELS", "OPTIMIZERS", "STRATEGIES",
    "TASKS", "TASK_MODELS", "ConfigError", "check_budget",
]

DEFAULT_BATCH = 64


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches in one epoch; Opacus samples each example with probability 1 / this number."""
    if num_examples < 1:
        raise ValueError("a site needs at least one training image")
    return math.ceil(num_examples / batch_size)


# The commands that offer a setting as a flag. A setting on neither is still a run-config key
# (`flwr run . --run-config`, a scenario's [run] table, a checkpoint).
SIMULATE, RUN = "simulate", "run"
BOTH = (SIMULATE, RUN)
_SAME = object()


def setting(
    default: Any,
    help: str,
    *,
    on: tuple[str, ...] = BOTH,
    shown: str | None = None,
    choices: type[StrEnum] | None = None,
    path: str | None = None,
    check: Callable[[Any, str], Any] | None = None,
    app: Any = _SAME,
    compare: bool = True,
    repr: bool = True,
) -> Any:
    """A RunConfig field: its default and everything the CLI and the Flower App derive from it.

    Args:
        help: the flag's help text (and the run-config key's comment).
        on: the commands with a `--kebab-case` flag for it (SIMULATE, RUN).
        shown: what `--help` says applies when the flag is not given, when the default alone
            does not say it (a 0 that means "planned").
        choices: the names the flag takes (common.registry's enums).
        path: "local" for a file the flag names on this machine (`medfed simulate` resolves
            it: its sites may run in another folder), "as-given" for one passed on unchanged.
        check: called as check(value, "--flag") when the flag is given, to refuse a bad value
            as a usage error before anything runs.
        app: the Flower App's default in pyproject when not the library's (the demo's data).

    """
    metadata = {"help": help, "on": on, "shown": shown, "choices": choices, "path": path,
                "check": check, "app": _SAME if app is _SAME else app}
    return field(default=default, metadata=metadata, compare=compare, repr=repr)


def app_default(f: dataclasses.Field[Any]) -> Any:
    """A field's default in the Flower App's run config (pyproject's [tool.flwr.app.config])."""
    app = f.metadata.get("app", _SAME)
    return f.default if app is _SAME else app


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a federated run. Field names map to `--kebab-case` flags."""

    sites_dir: str = setting(
        "", "Folder holding one folder per site (`--data`).", on=(), app="data/demo/sites")
    test_data: str = setting(
        "", "Held-out folder; every image in it is a test image.", on=(SIMULATE,),
        path="as-given", app="data/demo/test")
    out: str = setting("runs/latest", "Run folder to write (`--out`).", on=(), app="runs/flwr")
    task: str = setting(
        Task.classify.value, "classify (labels), segment (masks: U-Net), autoencode (no labels "
        "needed) or synthesize (DP conditional GAN).", choices=Task)
    model: str = setting(
        "", f"The network; with --task classify one of {', '.join(TASK_MODELS['classify'])} "
        "(all with GroupNorm, as DP-SGD needs); each other task has one.",
        shown=f"the task's first (classify: {TASK_MODELS['classify'][0]})")
    image_size: int = setting(64, "Model input size.")
    channels: int = setting(1, "Image channels the network takes: 1 (grey) or 3 (colour).")
    num_classes: int = setting(
        2, "Classes (classify, synthesize) or mask labels incl. background (segment).")
    strategy: str = setting(Strategy.fedavg.value, "Aggregation strategy.", choices=Strategy)
    rounds: int = setting(5, "Federated rounds.", app=20)
    # a 30-image site and a 3,000-image site both train the same number of steps
    local_steps: int = setting(
        20, "A round's local work in optimiser steps, the same at every site whatever its size.")
    local_epochs: int = setting(
        0, "Local epochs per round instead of --local-steps (0: use --local-steps).")
    # 0: segmentation's batch holds about as many pixels as 16 images of 64 x 64
    # (common.seg_plan.planned_batch), so a step's arithmetic on a site's CPU does not grow with
    # the image size
    batch_size: int = setting(
        0, "Local batch size.", shown="64; segment: 16 at 64 px, 4 at 128 px and above")
    optimizer: str = setting("adam", "Local optimiser: adam or sgd.", on=())
    lr: float = setting(1e-3, "Local learning rate.")
    momentum: float = setting(0.9, "SGD momentum (with optimizer sgd).", on=())
    dp: bool = setting(True, "DP-SGD at every site.")
    target_epsilon: float = setting(8.0, "Each site's epsilon for the whole run.")
    delta: float = setting(1e-5, "DP delta.")
    max_grad_norm: float = setting(1.0, "Per-sample gradient clipping norm.")
    accountant: str = setting("rdp", "Opacus privacy accountant: rdp, prv or gdp.", on=())
    fraction_train: float = setting(1.0, "Share of sites sampled per round.")
    fraction_evaluate: float = setting(
        1.0, "Share of sites asked to evaluate each round.", on=())
    min_sites: int = setting(2, "Fewest sites a round needs.")
    proximal_mu: float = setting(0.01, "FedProx mu (with --strategy fedprox).")
    server_lr: float = setting(0.01, "Server learning rate of fedadam and fedyogi.", on=())
    trimmed_beta: float = setting(
        0.2, "Share trimmed at each end by fedtrimmedavg, in [0, 0.5).", on=())
    krum_byzantine: int = setting(0, "Malicious sites Krum tolerates.", on=())
    round_timeout: float = setting(3600.0, "Seconds a round waits for the sites' replies.", on=())
    # one message per round (common.evaluation): the sites score each round's model at the
    # start of the next round's training message
    evaluate_every: int = setting(
        0, "Send the sites an evaluation message after every N-th round (1: every round); "
        "the other rounds' models are scored at the start of the next round's training "
        "message, and the last round is always followed by one.", shown="0: only the last")
    # a deployed run that never gets --min-sites sites is stopped instead of waiting for ever
    wait_timeout: float = setting(
        600.0, "Seconds to wait for --min-sites sites to connect before the run is stopped "
        "(exit 1).", on=(RUN,))
    # simulation only (0: none); deployed sites set their own with `medfed site --budget-epsilon`
    budget_epsilon: float = setting(
        0.0, "Privacy budget of each site's dataset over ALL runs; a round that would exceed it "
        "is refused.", on=(SIMULATE,), shown="none", check=check_budget)
    screen_z: float = setting(
        0.0, "Reject an update whose norm's robust z-score is above this, e.g. 3.5 (NaN/Inf, "
        "key, shape and dtype checks always run); 0: off.")
    ledger_dir: str = setting(
        "", "Where sites keep their privacy ledgers.", on=(SIMULATE,), path="as-given",
        shown="$MEDFED_LEDGER_DIR, else ~/.medfed/ledger")
    # the noise multiplier is calibrated so that `rounds` releases spend --target-epsilon
    central_dp: str = setting(
        "off", "User-level DP at the aggregator (Flower's wrappers): off, server-fixed, "
        "client-fixed, server-adaptive or client-adaptive. Combine with --no-dp for central DP "
        "alone.")
    central_noise: float = setting(
        0.0, "Central DP noise multiplier.",
        shown="calibrated so --rounds releases spend --target-epsilon")
    clip_norm: float = setting(
        1.0, "Central DP clipping norm of a site's update (initial norm when adaptive).")
    # SecAgg+ (Flower's workflow); a dropout is recovered while `threshold` shares survive
    secure_agg: bool = setting(
        False, "Flower's SecAgg+: the aggregator only sees the sum of masked updates.")
    secagg_shares: float = setting(
        1.0, "SecAgg+ shares per site: a fraction of the sampled sites (<= 1) or a count (>= 3).")
    secagg_threshold: float = setting(
        0.6, "SecAgg+ shares needed to rebuild a dropped site's mask: a fraction of the shares "
        "(<= 1) or a count.")
    # a site's weight in the masked sum is min(examples, max-weight) / max-weight, quantised with
    # the model to 2**22 levels over [-8, 8]: a much larger value costs precision
    secagg_max_weight: float = setting(
        1000.0, "SecAgg+ weight scale: about the largest site's training images (larger sites "
        "count as this many).")
    init_encoder: str = setting(
        "", "With --task classify: a finished --task autoencode run folder whose encoder "
        "initialises the classifier (federated pretraining).", path="local")
    # with --init-encoder and 0: a linear probe; under DP-SGD only the head's gradients are
    # then clipped and noised
    encoder_lr_scale: float = setting(
        1.0, "With --task classify: the feature blocks' learning rate as a multiple of --lr; 0 "
        "freezes them and only the head trains.")
    # the spot term (common.training.tasks.autoencode) teaches the encoder where lesions are
    spot_weight: float = setting(
        0.0, "With --task autoencode: weight of the spot term, which teaches the encoder where "
        "lesions are (0.1 for an encoder to pass to --init-encoder; 0: reconstruction only, the "
        "better anomaly score under DP).")
    # balanced softmax: on balanced sites it changes nothing
    logit_adjust: float = setting(
        1.0, "With --task classify: logit adjustment (balanced softmax) from each site's own "
        "class counts, times this tau; keeps one-class sites from biasing the model (0: off).")
    # common.training.augment; measured on BreastMNIST to lift test AUC
    augment: bool = setting(
        True, "With --task classify or segment: random small rotations, scaling, shifts and "
        "intensity jitter of each training image (classify also flips; segment moves the mask "
        "with its image).")
    # server.cross_site; off saves that message exchange
    cross_site: bool = setting(
        True, "After the last round, every site scores the final model on its own test split "
        "(results.json cross_site, the model card's per-site table).")
    # 0 leaves each to the planner (common.seg_plan.planned_shape)
    net_width: int = setting(
        0, "With --task segment: channels of the U-Net's first level (each deeper level doubles "
        "them).", shown="(planned from --image-size and DP)")
    net_depth: int = setting(
        0, "With --task segment: the U-Net's down-sampling steps.",
        shown="(planned from --image-size and DP)")
    # 3: volumes resampled to cubes (common.volumes), random patches (common.training.patches)
    dims: int = setting(
        2, "With --task segment: 2 trains on 2D images and on each slice of a volume; 3 trains a "
        "3D U-Net on whole volumes (each resampled to an --image-size cube), on random patches, "
        "and predicts with a sliding window.")
    patch_size: int = setting(
        0, "With --dims 3: the edge of the random training patches, in voxels.",
        shown="(planned: the whole volume up to --image-size 64, else half of it)")
    target_sensitivity: float = setting(
        0.0, "With --task classify (2 classes): pick the operating threshold that reaches this "
        "sensitivity on the sites' validation data (0: Youden's J).")
    pretrained: str = setting(
        "", "With --task classify: a state dict (.pt) you bring, loaded into the network before "
        "round 1 (layers of other shapes keep their initial weights).", path="local")
    seed: int = setting(0, "Seed.")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.")
    run_key: str = setting(
        "", "The run's id: names its files in every site's state folder.", on=(), compare=False)
    # common.runsign: checked by every deployed site before it trains; no effect on training
    run_signature: str = setting(
        "", "Set by `medfed run`: the operator's signature over the app and these settings.",
        on=(), compare=False, repr=False)
    run_operator: str = setting(
        "", "Set by `medfed run`: the operator who signed the run.", on=(), compare=False)
    def __post_init__(self) -> None:
        for f in fields(self):  # inf passes "> 0" and nan fails every rule unnamed
            if f.type == "float":
                require(self, math.isfinite(getattr(self, f.name)), f.name,
                        "must be a finite number")
        require(self, self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}")
        if not self.model:
            # frozen: resolving the default once here keeps every reader on the same network
            object.__setattr__(self, "model", TASK_MODELS[self.task][0])
        if self.batch_size == 0 and self.image_size >= 1:
            from common.seg_plan import planned_batch, planned_patch

            batch = DEFAULT_BATCH
            if self.task == "segment":  # a volume's batch holds its training patches' voxels
                edge = (self.patch_size or planned_patch(self.image_size)
                        if self.dims == 3 else self.image_size)
                batch = planned_batch(max(edge, 1), 3 if self.dims == 3 else 2)
            object.__setattr__(self, "batch_size", batch)
        check_run(self)

    def patch(self) -> int:
        """The training patch's edge in voxels under --dims 3 (given or planned); 0 in 2D."""
        if self.dims != 3:
            return 0
        from common.seg_plan import planned_patch

        return self.patch_size or planned_patch(self.image_size)

    def network_size(self) -> int:
        """The spatial edge the network is built for: the patch in 3D, the image otherwise."""
        return self.patch() or self.image_size

    def unet_shape(self) -> tuple[int, int]:
        from common.seg_plan import planned_shape

        width, depth = planned_shape(self.network_size(), dp=self.dp)
        return self.net_width or width, self.net_depth or depth

    def network_args(self) -> dict[str, Any]:
        """`models.build_model`'s arguments for this run's network (the U-Net's shape planned)."""
        args: dict[str, Any] = {
            "in_channels": self.channels, "num_classes": self.num_classes,
            "image_size": self.image_size,
        }
        if self.model == "unet":
            width, depth = self.unet_shape()
            args.update(width=width, depth=depth, dims=self.dims, image_size=self.network_size())
        return args

    def steps_per_round(self, num_examples: int) -> int:
        """Optimiser steps a site with `num_examples` training samples takes in one round."""
        if self.local_epochs:
            return self.local_epochs * batches_per_epoch(num_examples, self.batch_size)
        return self.local_steps

    # --- conversions ----------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, strict: bool = True) -> RunConfig:
        """Build from a mapping with kebab- or snake-case keys (run_config, JSON, CLI).

        Values are coerced to each field's type; unknown keys raise unless `strict=False`.
        """
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                if strict:
                    raise ConfigError(
                        f"unknown setting {raw_key!r}; known settings: "
                        + ", ".join(sorted(k.replace("_", "-") for k in known))
                    )
                continue
            kwargs[key] = _coerce(key, known[key].type, value)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case keys and scalar values: fits Flower's run_config and ConfigRecord."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _coerce(key: str, type_name: Any, value: Any) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    try:
        if kind == "bool":
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("1", "true", "yes", "on"):
                    return True
                if lowered in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag(key)} must be a {kind}, got {value!r}") from None
