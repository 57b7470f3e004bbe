"""A federated run's configuration, parsed once at the boundary and passed down frozen.

The same `RunConfig` comes from `medfed simulate` flags, from `flwr run . --run-config`
(`context.run_config`, keys in kebab-case as in pyproject's `[tool.flwr.app.config]`), and from a
checkpoint when a run resumes. Every value is validated here, with the flag that set it named in
the error, so nothing deeper in the code needs to re-check user input.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

TASKS = ("classify", "segment", "autoencode", "synthesize")
STRATEGIES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "scaffold",
)
ACCOUNTANTS = ("rdp", "prv", "gdp")
OPTIMIZERS = ("adam", "sgd")
# the networks each task can train; the first is the task's default (`--model` left empty)
TASK_MODELS: Mapping[str, tuple[str, ...]] = {
    "classify": ("cnn", "resnet18", "resnet34", "densenet121"),
    "segment": ("unet",),
    "autoencode": ("autoencoder",),
    "synthesize": ("cgan",),
}
MODELS = tuple(m for models in TASK_MODELS.values() for m in models)
DEFAULT_BATCH = 64
# user-level (central) DP with Flower's wrappers: who clips each site's update, fixed or adaptive
CENTRAL_DP = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
# strategies whose aggregate is a (weighted) mean of the updates: what central DP's sensitivity
# analysis and secure aggregation's masked sum both assume
MEAN_STRATEGIES = ("fedavg", "fedprox")
# a run key names files in every site's state folder (privacy/<run-key>.json): a file name,
# never a path
_RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches in one epoch; Opacus samples each example with probability 1 / this number."""
    if num_examples < 1:
        raise ValueError("a site needs at least one training image")
    return math.ceil(num_examples / batch_size)


class ConfigError(ValueError):
    """A configuration value a user set is invalid; the message names the flag and the rule."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_budget(value: object, where: str) -> float:
    """A privacy budget as given at `where` (a flag, a file's key): a finite epsilon > 0.

    NaN compares false with everything and inf is no limit at all, so either would silently
    mean "no budget"; leaving the budget out is how a hospital says that.
    """
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number <= 0:
        raise ConfigError(
            f"{where} must be a finite epsilon > 0 (e.g. 8), got {value!r}; leave it out for "
            "no budget"
        )
    return float(number)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a federated run. Field names map to `--kebab-case` flags."""

    sites_dir: str = ""
    test_data: str = ""
    out: str = "runs/latest"
    task: str = "classify"
    # empty: the task's default network (TASK_MODELS)
    model: str = ""
    image_size: int = 64
    channels: int = 1
    num_classes: int = 2
    strategy: str = "fedavg"
    rounds: int = 5
    # a round's local work: --local-steps optimiser steps at every site, whatever its size (a
    # 30-image site and a 3,000-image site both train); --local-epochs N > 0 trains N passes
    # over the site's data instead
    local_steps: int = 20
    local_epochs: int = 0
    # 0: the task's batch, 64 images, except segmentation, whose batch holds about as many
    # pixels as 16 images of 64 x 64 (common.seg_plan.planned_batch: 4 at 128 px and above),
    # so that a step's arithmetic on a site's CPU does not grow with the image size
    batch_size: int = 0
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    dp: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    trimmed_beta: float = 0.2
    krum_byzantine: int = 0
    round_timeout: float = 3600.0
    # deployment: seconds the aggregator waits for --min-sites sites to connect before round 1;
    # a run that never gets them is stopped instead of waiting silently for ever
    wait_timeout: float = 600.0
    # simulation only: every virtual site's privacy budget over all runs (0: none) and where
    # their ledgers are (empty: $MEDFED_LEDGER_DIR or ~/.medfed/ledger); deployed sites set
    # their own with `medfed site --budget-epsilon`
    budget_epsilon: float = 0.0
    # robust z-score above which an update's norm is rejected before aggregation (0: no norm
    # check; NaN/Inf, key, shape and dtype checks always run)
    screen_z: float = 0.0
    ledger_dir: str = ""
    # user-level DP added at the aggregator (Flower's clipping wrappers): the noise multiplier is
    # calibrated so that `rounds` releases spend --target-epsilon unless --central-noise is set
    central_dp: str = "off"
    central_noise: float = 0.0
    clip_norm: float = 1.0
    # SecAgg+ (Flower's workflow): the aggregator only ever holds the sum of masked updates.
    # Shares per site's secret and the shares needed to rebuild one: a fraction (<= 1, of the
    # sampled sites) or a count; a dropout is recovered while `threshold` shares survive.
    secure_agg: bool = False
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.6
    # A site's weight in the masked sum is min(examples, max-weight) / max-weight, quantised with
    # the model to 2**22 levels over [-8, 8]: set it near the largest site's training set (a
    # much larger value costs precision, a larger site counts as max-weight examples).
    secagg_max_weight: float = 1000.0
    # classify only: a finished `--task autoencode` run whose encoder initialises the classifier
    init_encoder: str = ""
    # classify only: the CNN's feature blocks learn at --lr times this; 0 freezes them and only
    # the head trains (with --init-encoder: a linear probe of the pretrained encoder; under
    # DP-SGD only the head's gradients are then clipped and noised)
    encoder_lr_scale: float = 1.0
    # autoencode only: weight of the spot term (common.training.tasks.autoencode), which teaches the
    # encoder where lesions are, for --init-encoder; 0 (default): reconstruction only, the
    # better anomaly detector under DP-SGD
    spot_weight: float = 0.0
    # classify only: logit adjustment (balanced softmax) with each site's own class counts,
    # scaled by this tau; 0 turns it off. It keeps a site that holds one class from teaching the
    # global model that everyone has that class; on balanced sites it changes nothing.
    logit_adjust: float = 1.0
    # classify and segment: each training image randomly rotated, scaled, shifted and
    # intensity-jittered (common.training.augment; classify also flips, segment moves the mask
    # with its image); measured on BreastMNIST to lift test AUC
    augment: bool = True
    # after the last round, the final model scored once more at every site on its own test
    # split (results.json `cross_site`, server.cross_site); off saves that message exchange
    cross_site: bool = True
    # segment only: the U-Net's first-level channels and down-sampling steps; 0 leaves each to
    # the planner (common.seg_plan.planned_shape: from the image size and whether DP trains)
    net_width: int = 0
    net_depth: int = 0
    # segment only: 2 trains on slices (every slice of a volume is one sample); 3 trains on
    # volumes, each resampled to an --image-size cube (common.volumes), on random patches of
    # --patch-size voxels (common.training.patches), and predicts whole volumes with a sliding
    # window
    dims: int = 2
    # --dims 3 only: the training patch's edge in voxels; 0 plans it (`planned_patch`)
    patch_size: int = 0
    # classify only: the operating point's sensitivity on the sites' validation data; 0 picks
    # the threshold of Youden's J (sensitivity + specificity - 1 at its largest)
    target_sensitivity: float = 0.0
    # classify only: a state dict (a .pt file the user brings) loaded into the network before
    # round 1; layers whose shapes differ (a head with other classes) keep their initial weights
    pretrained: str = ""
    seed: int = 0
    device: str = "auto"
    run_key: str = field(default="", compare=False)
    # the operator's signature over the FAB hash and this run's settings, and its signer
    # (common.runsign): checked by every deployed site before it trains; no effect on training
    run_signature: str = field(default="", compare=False, repr=False)
    run_operator: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{_flag(name)} {rule}, got {getattr(self, name)!r}")

        for f in fields(self):  # inf passes "> 0" and nan fails every rule unnamed
            if f.type == "float":
                need(math.isfinite(getattr(self, f.name)), f.name, "must be a finite number")
        need(self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}")
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
        need(
            self.model in TASK_MODELS[self.task], "model",
            f"must be one of {', '.join(TASK_MODELS[self.task])} for --task {self.task} "
            "(or leave it out for the task's default)",
        )
        need(
            not self.init_encoder or self.task == "classify", "init_encoder",
            "initialises a classifier: use it with --task classify",
        )
        if self.init_encoder and self.model != "cnn":
            raise ConfigError(
                f"--init-encoder initialises --model cnn (the autoencoder's encoder has its "
                f"layout), got --model {self.model}; use --pretrained FILE for {self.model}"
            )
        need(self.encoder_lr_scale >= 0, "encoder_lr_scale", "must be >= 0 (0: frozen)")
        need(
            self.encoder_lr_scale == 1 or self.task == "classify", "encoder_lr_scale",
            "sets the classifier's feature blocks' learning rate: use it with --task classify",
        )
        need(self.spot_weight >= 0, "spot_weight", "must be >= 0 (0: reconstruction only)")
        need(
            self.spot_weight == 0 or self.task == "autoencode", "spot_weight",
            "weighs the autoencoder's spot term: use it with --task autoencode",
        )
        need(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}")
        need(
            self.strategy != "scaffold" or self.task != "synthesize", "strategy",
            "scaffold corrects one network's steps; a GAN trains two against each other: use "
            "fedavg with --task synthesize",
        )
        need(
            self.accountant in ACCOUNTANTS, "accountant", f"must be one of {', '.join(ACCOUNTANTS)}"
        )
        need(8 <= self.image_size <= 1024, "image_size", "must be between 8 and 1024")
        need(self.channels in (1, 3), "channels", "must be 1 or 3")
        need(self.num_classes >= 2, "num_classes", "must be >= 2")
        need(self.rounds >= 1, "rounds", "must be >= 1")
        need(self.local_steps >= 1, "local_steps", "must be >= 1")
        need(self.local_epochs >= 0, "local_epochs", "must be >= 0 (0: use --local-steps)")
        need(self.logit_adjust >= 0, "logit_adjust", "must be >= 0 (0: off)")
        need(
            0 <= self.target_sensitivity < 1, "target_sensitivity",
            "must be in [0, 1), e.g. 0.9 (0: Youden's J)",
        )
        need(
            self.target_sensitivity == 0 or (self.task == "classify" and self.num_classes == 2),
            "target_sensitivity", "sets a binary classifier's operating point: use it with "
            "--task classify and --num-classes 2",
        )
        need(
            not self.pretrained or self.task == "classify", "pretrained",
            "loads a classifier's weights: use it with --task classify",
        )
        need(self.net_width == 0 or self.net_width >= 4, "net_width",
             "must be >= 4 channels (0: planned from the image size)")
        need(0 <= self.net_depth <= 6, "net_depth",
             "must be 1 to 6 down-sampling steps (0: planned from the image size)")
        need(
            (self.net_width == 0 and self.net_depth == 0) or self.task == "segment",
            "net_width" if self.net_width else "net_depth",
            "shapes the U-Net: use it with --task segment",
        )
        need(self.dims in (2, 3), "dims", "must be 2 (images, slices) or 3 (volumes)")
        need(
            self.dims == 2 or self.task == "segment", "dims",
            "trains a U-Net on whole volumes: use it with --task segment (other tasks read "
            "a volume slice by slice)",
        )
        need(self.patch_size >= 0, "patch_size", "must be >= 0 voxels (0: planned)")
        need(
            self.patch_size == 0 or self.dims == 3, "patch_size",
            "crops training patches out of volumes: use it with --dims 3",
        )
        need(
            self.patch_size <= self.image_size, "patch_size",
            f"must fit in the --image-size {self.image_size} volume; lower it (or 0: planned)",
        )
        size, what = (
            (self.network_size(), "--patch-size") if self.dims == 3 else
            (self.image_size, "--image-size")
        )
        need(
            self.net_depth == 0 or size % 2**self.net_depth == 0, "net_depth",
            f"halves {what} {size} that many times, which must stay whole: "
            f"lower it or pick a power-of-two {what}",
        )
        if self.dims == 3:
            _, depth = self._unet_shape()
            need(
                self.network_size() % 2**depth == 0,
                "patch_size" if self.patch_size else "image_size",
                f"must divide by {2**depth} under --dims 3 (a depth-{depth} U-Net halves each "
                f"training patch {depth} time(s)); pick a multiple of {2**depth}",
            )
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.target_epsilon > 0, "target_epsilon", "must be > 0")
        need(0 < self.delta < 1, "delta", "must be in (0, 1); use e.g. 1e-5")
        if self.dp:
            self._check_epsilon_trains()
        need(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        need(0 < self.fraction_train <= 1, "fraction_train", "must be in (0, 1]")
        need(0 <= self.fraction_evaluate <= 1, "fraction_evaluate", "must be in [0, 1]")
        need(self.min_sites >= 1, "min_sites", "must be >= 1")
        need(self.proximal_mu >= 0, "proximal_mu", "must be >= 0")
        need(self.server_lr > 0, "server_lr", "must be > 0")
        need(0 <= self.trimmed_beta < 0.5, "trimmed_beta", "must be in [0, 0.5)")
        need(self.krum_byzantine >= 0, "krum_byzantine", "must be >= 0")
        need(self.round_timeout > 0, "round_timeout", "must be > 0 seconds")
        need(self.wait_timeout > 0, "wait_timeout", "must be > 0 seconds, e.g. 600")
        need(
            self.budget_epsilon == 0
            or (math.isfinite(self.budget_epsilon) and self.budget_epsilon > 0),
            "budget_epsilon", "must be a finite epsilon > 0 (0 in a run config: no budget)",
        )
        need(self.screen_z >= 0, "screen_z", "must be >= 0 (0: no norm screening), e.g. 3.5")
        need(self.central_dp in CENTRAL_DP, "central_dp", f"must be one of {', '.join(CENTRAL_DP)}")
        need(self.central_noise >= 0, "central_noise", "must be >= 0 (0: calibrate to the target)")
        need(self.clip_norm > 0, "clip_norm", "must be > 0")
        need(
            0 < self.secagg_shares <= 1
            or (self.secagg_shares >= 3 and float(self.secagg_shares).is_integer()),
            "secagg_shares", "must be a fraction of the sampled sites in (0, 1] or a count >= 3",
        )
        need(
            0 < self.secagg_threshold <= 1
            or (
                float(self.secagg_threshold).is_integer()
                and (self.secagg_shares <= 1 or self.secagg_threshold < self.secagg_shares)
            ),
            "secagg_threshold",
            "must be a fraction of the shares in (0, 1] or a count below --secagg-shares",
        )
        need(self.secagg_max_weight >= 1, "secagg_max_weight", "must be >= 1 (examples)")
        if self.central_dp != "off" or self.secure_agg:
            need(
                self.strategy in MEAN_STRATEGIES, "strategy",
                "must be fedavg or fedprox with --central-dp or --secure-agg (both need the "
                "aggregate to be a mean of the updates)",
            )
        if self.secure_agg:
            need(
                self.central_dp in ("off", "client-fixed"), "central_dp",
                "must be off or client-fixed with --secure-agg (the aggregator never sees a "
                "single update, so each site clips its own, as in Flower's DP + SecAgg example)",
            )
            need(
                self.screen_z == 0, "screen_z",
                "must be 0 with --secure-agg (no single update is visible to screen)",
            )
        need(
            not self.run_key or bool(_RUN_KEY.match(self.run_key)), "run_key",
            "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it names a file in each site's state folder: no path, no separator)",
        )
        need(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            "must be auto, cpu, cuda or cuda:N",
        )

    def _check_epsilon_trains(self) -> None:
        """Refuse a target epsilon for which Opacus finds no noise: no site could train a step.

        The bound (common.privacy.smallest_epsilon) hardly depends on the sites' sizes, so it
        is checked here, before any site is asked. It lies below log(1/delta)/62 (RDP's largest
        order) and 0.02 (PRV), so Opacus is only loaded for targets that small.
        """
        if self.target_epsilon >= max(math.log(1 / self.delta) / 62, 0.02):
            return
        from common.privacy import smallest_epsilon

        floor = smallest_epsilon(delta=self.delta, accountant=self.accountant)
        if self.target_epsilon < floor:
            shown = math.ceil(floor * 1000) / 1000
            raise ConfigError(
                f"--target-epsilon {self.target_epsilon:g} is too small to train even one step: "
                f"Opacus finds no noise multiplier for it. The smallest that works at --delta "
                f"{self.delta:g} (--accountant {self.accountant}) is {shown:g}; raise "
                "--target-epsilon (or --delta), or train without DP (--no-dp)"
            )

    def patch(self) -> int:
        """The training patch's edge in voxels under --dims 3 (given or planned); 0 in 2D."""
        if self.dims != 3:
            return 0
        from common.seg_plan import planned_patch

        return self.patch_size or planned_patch(self.image_size)

    def network_size(self) -> int:
        """The spatial edge the network is built for: the patch in 3D, the image otherwise."""
        return self.patch() or self.image_size

    def _unet_shape(self) -> tuple[int, int]:
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
            width, depth = self._unet_shape()
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
        raise ConfigError(f"{_flag(key)} must be a {kind}, got {value!r}") from None
