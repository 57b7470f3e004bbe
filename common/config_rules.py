"""The rules a run's settings must follow, each error naming the flag, the value and the fix.

common.config.RunConfig calls `check_run` once, when it is built; the names and errors here are
re-exported by common.config, where the rest of the code imports them from.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from common.registry import MEAN_STRATEGIES, STRATEGIES, TASK_MODELS

if TYPE_CHECKING:
    from common.config import RunConfig

ACCOUNTANTS = ("rdp", "prv", "gdp")
OPTIMIZERS = ("adam", "sgd")
# user-level (central) DP with Flower's wrappers: who clips each site's update, fixed or adaptive
CENTRAL_DP = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
# a run key names files in every site's state folder (privacy/<run-key>.json): a file name,
# never a path
_RUN_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ValueError):
    """A configuration value a user set is invalid; the message names the flag and the rule."""


def flag(name: str) -> str:
    """The `--kebab-case` flag of a setting's field name."""
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


def require(cfg: RunConfig, ok: bool, name: str, rule: str) -> None:
    """Raise ConfigError naming the flag of field `name`, its value and `rule` unless `ok`."""
    if not ok:
        raise ConfigError(f"{flag(name)} {rule}, got {getattr(cfg, name)!r}")


def check_run(cfg: RunConfig) -> None:
    """Check every value (the task and the defaults it implies are already resolved)."""

    def need(ok: bool, name: str, rule: str) -> None:
        require(cfg, ok, name, rule)

    need(
        cfg.model in TASK_MODELS[cfg.task], "model",
        f"must be one of {', '.join(TASK_MODELS[cfg.task])} for --task {cfg.task} "
        "(or leave it out for the task's default)",
    )
    need(
        not cfg.init_encoder or cfg.task == "classify", "init_encoder",
        "initialises a classifier: use it with --task classify",
    )
    if cfg.init_encoder and cfg.model != "cnn":
        raise ConfigError(
            f"--init-encoder initialises --model cnn (the autoencoder's encoder has its "
            f"layout), got --model {cfg.model}; use --pretrained FILE for {cfg.model}"
        )
    need(cfg.encoder_lr_scale >= 0, "encoder_lr_scale", "must be >= 0 (0: frozen)")
    need(
        cfg.encoder_lr_scale == 1 or cfg.task == "classify", "encoder_lr_scale",
        "sets the classifier's feature blocks' learning rate: use it with --task classify",
    )
    need(cfg.spot_weight >= 0, "spot_weight", "must be >= 0 (0: reconstruction only)")
    need(
        cfg.spot_weight == 0 or cfg.task == "autoencode", "spot_weight",
        "weighs the autoencoder's spot term: use it with --task autoencode",
    )
    need(cfg.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}")
    need(
        cfg.strategy != "scaffold" or cfg.task != "synthesize", "strategy",
        "scaffold corrects one network's steps; a GAN trains two against each other: use "
        "fedavg with --task synthesize",
    )
    need(
        cfg.accountant in ACCOUNTANTS, "accountant", f"must be one of {', '.join(ACCOUNTANTS)}"
    )
    need(8 <= cfg.image_size <= 1024, "image_size", "must be between 8 and 1024")
    need(cfg.channels in (1, 3), "channels", "must be 1 or 3")
    need(cfg.num_classes >= 2, "num_classes", "must be >= 2")
    need(cfg.evaluate_every >= 0, "evaluate_every", "must be >= 0 (0: only after the last round)")
    need(cfg.rounds >= 1, "rounds", "must be >= 1")
    need(cfg.local_steps >= 1, "local_steps", "must be >= 1")
    need(cfg.local_epochs >= 0, "local_epochs", "must be >= 0 (0: use --local-steps)")
    need(cfg.logit_adjust >= 0, "logit_adjust", "must be >= 0 (0: off)")
    need(
        0 <= cfg.target_sensitivity < 1, "target_sensitivity",
        "must be in [0, 1), e.g. 0.9 (0: Youden's J)",
    )
    need(
        cfg.target_sensitivity == 0 or (cfg.task == "classify" and cfg.num_classes == 2),
        "target_sensitivity", "sets a binary classifier's operating point: use it with "
        "--task classify and --num-classes 2",
    )
    need(
        not cfg.pretrained or cfg.task == "classify", "pretrained",
        "loads a classifier's weights: use it with --task classify",
    )
    need(cfg.net_width == 0 or cfg.net_width >= 4, "net_width",
         "must be >= 4 channels (0: planned from the image size)")
    need(0 <= cfg.net_depth <= 6, "net_depth",
         "must be 1 to 6 down-sampling steps (0: planned from the image size)")
    need(
        (cfg.net_width == 0 and cfg.net_depth == 0) or cfg.task == "segment",
        "net_width" if cfg.net_width else "net_depth",
        "shapes the U-Net: use it with --task segment",
    )
    need(cfg.dims in (2, 3), "dims", "must be 2 (images, slices) or 3 (volumes)")
    need(
        cfg.dims == 2 or cfg.task == "segment", "dims",
        "trains a U-Net on whole volumes: use it with --task segment (other tasks read "
        "a volume slice by slice)",
    )
    need(cfg.patch_size >= 0, "patch_size", "must be >= 0 voxels (0: planned)")
    need(
        cfg.patch_size == 0 or cfg.dims == 3, "patch_size",
        "crops training patches out of volumes: use it with --dims 3",
    )
    need(
        cfg.patch_size <= cfg.image_size, "patch_size",
        f"must fit in the --image-size {cfg.image_size} volume; lower it (or 0: planned)",
    )
    size, what = (
        (cfg.network_size(), "--patch-size") if cfg.dims == 3 else
        (cfg.image_size, "--image-size")
    )
    need(
        cfg.net_depth == 0 or size % 2**cfg.net_depth == 0, "net_depth",
        f"halves {what} {size} that many times, which must stay whole: "
        f"lower it or pick a power-of-two {what}",
    )
    if cfg.dims == 3:
        _, depth = cfg.unet_shape()
        need(
            cfg.network_size() % 2**depth == 0,
            "patch_size" if cfg.patch_size else "image_size",
            f"must divide by {2**depth} under --dims 3 (a depth-{depth} U-Net halves each "
            f"training patch {depth} time(s)); pick a multiple of {2**depth}",
        )
    need(cfg.batch_size >= 1, "batch_size", "must be >= 1")
    need(cfg.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(0 <= cfg.momentum < 1, "momentum", "must be in [0, 1)")
    need(cfg.target_epsilon > 0, "target_epsilon", "must be > 0")
    need(0 < cfg.delta < 1, "delta", "must be in (0, 1); use e.g. 1e-5")
    if cfg.dp:
        _check_epsilon_trains(cfg)
    need(cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    need(0 < cfg.fraction_train <= 1, "fraction_train", "must be in (0, 1]")
    need(0 <= cfg.fraction_evaluate <= 1, "fraction_evaluate", "must be in [0, 1]")
    need(cfg.min_sites >= 1, "min_sites", "must be >= 1")
    need(cfg.proximal_mu >= 0, "proximal_mu", "must be >= 0")
    need(cfg.server_lr > 0, "server_lr", "must be > 0")
    need(0 <= cfg.trimmed_beta < 0.5, "trimmed_beta", "must be in [0, 0.5)")
    need(cfg.krum_byzantine >= 0, "krum_byzantine", "must be >= 0")
    need(cfg.round_timeout > 0, "round_timeout", "must be > 0 seconds")
    need(cfg.wait_timeout > 0, "wait_timeout", "must be > 0 seconds, e.g. 600")
    need(
        cfg.budget_epsilon == 0
        or (math.isfinite(cfg.budget_epsilon) and cfg.budget_epsilon > 0),
        "budget_epsilon", "must be a finite epsilon > 0 (0 in a run config: no budget)",
    )
    need(cfg.screen_z >= 0, "screen_z", "must be >= 0 (0: no norm screening), e.g. 3.5")
    need(cfg.central_dp in CENTRAL_DP, "central_dp", f"must be one of {', '.join(CENTRAL_DP)}")
    need(cfg.central_noise >= 0, "central_noise", "must be >= 0 (0: calibrate to the target)")
    need(cfg.clip_norm > 0, "clip_norm", "must be > 0")
    need(
        0 < cfg.secagg_shares <= 1
        or (cfg.secagg_shares >= 3 and float(cfg.secagg_shares).is_integer()),
        "secagg_shares", "must be a fraction of the sampled sites in (0, 1] or a count >= 3",
    )
    need(
        0 < cfg.secagg_threshold <= 1
        or (
            float(cfg.secagg_threshold).is_integer()
            and (cfg.secagg_shares <= 1 or cfg.secagg_threshold < cfg.secagg_shares)
        ),
        "secagg_threshold",
        "must be a fraction of the shares in (0, 1] or a count below --secagg-shares",
    )
    need(cfg.secagg_max_weight >= 1, "secagg_max_weight", "must be >= 1 (examples)")
    if cfg.central_dp != "off" or cfg.secure_agg:
        need(
            cfg.strategy in MEAN_STRATEGIES, "strategy",
            "must be fedavg or fedprox with --central-dp or --secure-agg (both need the "
            "aggregate to be a mean of the updates)",
        )
    if cfg.secure_agg:
        need(
            cfg.central_dp in ("off", "client-fixed"), "central_dp",
            "must be off or client-fixed with --secure-agg (the aggregator never sees a "
            "single update, so each site clips its own, as in Flower's DP + SecAgg example)",
        )
        need(
            cfg.screen_z == 0, "screen_z",
            "must be 0 with --secure-agg (no single update is visible to screen)",
        )
    need(
        not cfg.run_key or bool(_RUN_KEY.match(cfg.run_key)), "run_key",
        "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
        "(it names a file in each site's state folder: no path, no separator)",
    )
    need(
        cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
        "device",
        "must be auto, cpu, cuda or cuda:N",
    )


def _check_epsilon_trains(cfg: RunConfig) -> None:
    """Refuse a target epsilon for which Opacus finds no noise: no site could train a step.

    The bound (common.privacy.smallest_epsilon) hardly depends on the sites' sizes, so it
    is checked here, before any site is asked. It lies below log(1/delta)/62 (RDP's largest
    order) and 0.02 (PRV), so Opacus is only loaded for targets that small.
    """
    if cfg.target_epsilon >= max(math.log(1 / cfg.delta) / 62, 0.02):
        return
    from common.privacy import smallest_epsilon

    floor = smallest_epsilon(delta=cfg.delta, accountant=cfg.accountant)
    if cfg.target_epsilon < floor:
        shown = math.ceil(floor * 1000) / 1000
        raise ConfigError(
            f"--target-epsilon {cfg.target_epsilon:g} is too small to train even one step: "
            f"Opacus finds no noise multiplier for it. The smallest that works at --delta "
            f"{cfg.delta:g} (--accountant {cfg.accountant}) is {shown:g}; raise "
            "--target-epsilon (or --delta), or train without DP (--no-dp)"
        )
