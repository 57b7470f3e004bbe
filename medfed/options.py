"""Training options shared by `medfed simulate` and `medfed run`: one definition, one help text.

Each is None when not given, so that the run's defaults (common.config.RunConfig, or the Flower
App's run config) apply and a resumed run keeps its own values.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from common.config import TASK_MODELS, RunConfig

_RUN = RunConfig()


def _default(name: str) -> str:
    """The run's default for a setting as --help shows it (declared once, in RunConfig)."""
    value = getattr(_RUN, name)
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if value != "" else "none"


def _option(*decls: str, help: str, shown: str, **extra: Any) -> Any:
    """typer.Option whose help ends with what applies when the flag is not given.

    Escaped, because rich reads a bare "[default: 5]" as markup and drops it from --help, and
    typer's show_default="5" prints "(5)".
    """
    return typer.Option(*decls, help=f"{help} \\[default: {shown}]", **extra)


class Strategy(StrEnum):
    """Aggregation strategies: Flower's, and SCAFFOLD built on Flower's FedAvg."""

    fedavg = "fedavg"
    fedprox = "fedprox"
    fedadam = "fedadam"
    fedyogi = "fedyogi"
    fedmedian = "fedmedian"
    fedtrimmedavg = "fedtrimmedavg"
    krum = "krum"
    scaffold = "scaffold"


class Task(StrEnum):
    """What the federation learns."""

    classify = "classify"
    segment = "segment"
    autoencode = "autoencode"
    synthesize = "synthesize"


TaskOpt = Annotated[
    Task | None,
    _option(help="classify (labels), segment (masks: U-Net), autoencode (no labels needed) "
                 "or synthesize (DP conditional GAN).", shown=_default("task")),
]
ModelOpt = Annotated[
    str | None,
    _option(help="The network; with --task classify one of "
                 f"{', '.join(TASK_MODELS['classify'])} (all with GroupNorm, as DP-SGD needs); "
                 "each other task has one.",
                 shown=f"the task's first (classify: {TASK_MODELS['classify'][0]})"),
]
Channels = Annotated[
    int | None,
    _option(help="Image channels the network takes: 1 (grey) or 3 (colour).",
                 shown=_default("channels")),
]
InitEncoder = Annotated[
    Path | None,
    _option(help="With --task classify: a finished --task autoencode run folder whose "
                 "encoder initialises the classifier (federated pretraining).",
                 shown=_default("init_encoder")),
]
EncoderLrScale = Annotated[
    float | None,
    _option(help="With --task classify: the feature blocks' learning rate as a multiple of "
                 "--lr; 0 freezes them and only the head trains.",
                 shown=_default("encoder_lr_scale")),
]
SpotWeight = Annotated[
    float | None,
    _option(help="With --task autoencode: weight of the spot term, which teaches the encoder "
                 "where lesions are (0.1 for an encoder to pass to --init-encoder; 0: "
                 "reconstruction only, the better anomaly score under DP).",
                 shown=_default("spot_weight")),
]
NumClasses = Annotated[
    int | None,
    _option(help="Classes (classify, synthesize) or mask labels incl. background (segment).",
                 shown=_default("num_classes")),
]
TestData = Annotated[
    Path | None,
    _option(help="Held-out folder; every image in it is a test image.",
                 shown=_default("test_data")),
]
Rounds = Annotated[
    int | None, _option(help="Federated rounds.", shown=_default("rounds"))
]
StrategyOpt = Annotated[
    Strategy | None,
    _option(help="Aggregation strategy.", shown=_default("strategy")),
]
Dp = Annotated[
    bool | None,
    _option("--dp/--no-dp", help="DP-SGD at every site.", shown=_default("dp")),
]
TargetEpsilon = Annotated[
    float | None,
    _option(help="Each site's epsilon for the whole run.",
                 shown=_default("target_epsilon")),
]
Delta = Annotated[float | None, _option(help="DP delta.", shown=_default("delta"))]
MaxGradNorm = Annotated[
    float | None,
    _option(help="Per-sample gradient clipping norm.", shown=_default("max_grad_norm")),
]
LocalEpochs = Annotated[
    int | None,
    _option(help="Local epochs per round instead of --local-steps (0: use --local-steps).",
                 shown=_default("local_epochs")),
]
LocalSteps = Annotated[
    int | None,
    _option(help="A round's local work in optimiser steps, the same at every site whatever "
                 "its size.", shown=_default("local_steps")),
]
LogitAdjust = Annotated[
    float | None,
    _option(help="With --task classify: logit adjustment (balanced softmax) from each site's "
                 "own class counts, times this tau; keeps one-class sites from biasing the "
                 "model (0: off).", shown=_default("logit_adjust")),
]
Augment = Annotated[
    bool | None,
    _option("--augment/--no-augment",
            help="With --task classify or segment: random small rotations, scaling, shifts and "
                 "intensity jitter of each training image (classify also flips; segment moves "
                 "the mask with its image).", shown=_default("augment")),
]
CrossSite = Annotated[
    bool | None,
    _option("--cross-site/--no-cross-site",
            help="After the last round, every site scores the final model on its own test "
                 "split (results.json cross_site, the model card's per-site table).",
            shown=_default("cross_site")),
]
NetWidth = Annotated[
    int | None,
    _option(help="With --task segment: channels of the U-Net's first level (each deeper level "
                 "doubles them).", shown="(planned from --image-size and DP)"),
]
NetDepth = Annotated[
    int | None,
    _option(help="With --task segment: the U-Net's down-sampling steps.",
            shown="(planned from --image-size and DP)"),
]
Dims = Annotated[
    int | None,
    _option(help="With --task segment: 2 trains on 2D images and on each slice of a volume; 3 "
                 "trains a 3D U-Net on whole volumes (each resampled to an --image-size cube), "
                 "on random patches, and predicts with a sliding window.",
            shown=_default("dims")),
]
PatchSize = Annotated[
    int | None,
    _option(help="With --dims 3: the edge of the random training patches, in voxels.",
            shown="(planned: the whole volume up to --image-size 64, else half of it)"),
]
TargetSensitivity = Annotated[
    float | None,
    _option(help="With --task classify (2 classes): pick the operating threshold that reaches "
                 "this sensitivity on the sites' validation data (0: Youden's J).",
                 shown=_default("target_sensitivity")),
]
Pretrained = Annotated[
    Path | None,
    _option(help="With --task classify: a state dict (.pt) you bring, loaded into the "
                 "network before round 1 (layers of other shapes keep their initial weights).",
                 shown=_default("pretrained")),
]
FractionTrain = Annotated[
    float | None,
    _option(help="Share of sites sampled per round.",
                 shown=_default("fraction_train")),
]
Seed = Annotated[int | None, _option(help="Seed.", shown=_default("seed"))]
BatchSize = Annotated[
    int | None,
    _option(help="Local batch size.",
            shown="64; segment: 16 at 64 px, 4 at 128 px and above"),
]
Lr = Annotated[float | None, _option(help="Local learning rate.", shown=_default("lr"))]
ImageSize = Annotated[
    int | None, _option(help="Model input size.", shown=_default("image_size"))
]
MinSites = Annotated[
    int | None, _option(help="Fewest sites a round needs.", shown=_default("min_sites"))
]
WaitTimeout = Annotated[
    float | None,
    _option(help="Seconds to wait for --min-sites sites to connect before the run is "
                 "stopped (exit 1).", shown=_default("wait_timeout")),
]
ProximalMu = Annotated[
    float | None,
    _option(help="FedProx mu (with --strategy fedprox).",
                 shown=_default("proximal_mu")),
]
Device = Annotated[
    str | None,
    _option(help="auto, cpu, cuda or cuda:N.", shown=_default("device")),
]
def budget_flag(value: float | None) -> float | None:
    """--budget-epsilon: a finite epsilon > 0 when given (usage error, exit 2, otherwise)."""
    from common.config import ConfigError, check_budget

    try:
        return None if value is None else check_budget(value, "--budget-epsilon")
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


BudgetEpsilon = Annotated[
    float | None,
    _option(help="Privacy budget of each site's dataset over ALL runs; a round that would "
                 "exceed it is refused.", shown="none", callback=budget_flag),
]
LedgerDir = Annotated[
    Path | None,
    _option(help="Where sites keep their privacy ledgers.",
                 shown="$MEDFED_LEDGER_DIR, else ~/.medfed/ledger"),
]
ScreenZ = Annotated[
    float | None,
    _option(help="Reject an update whose norm's robust z-score is above this, e.g. 3.5 "
                 "(NaN/Inf, key, shape and dtype checks always run); 0: off.",
                 shown=_default("screen_z")),
]
CentralDp = Annotated[
    str | None,
    _option(help="User-level DP at the aggregator (Flower's wrappers): off, server-fixed, "
                 "client-fixed, server-adaptive or client-adaptive. Combine with --no-dp for "
                 "central DP alone.", shown=_default("central_dp")),
]
CentralNoise = Annotated[
    float | None,
    _option(help="Central DP noise multiplier.",
                 shown="calibrated so --rounds releases spend --target-epsilon"),
]
ClipNorm = Annotated[
    float | None,
    _option(help="Central DP clipping norm of a site's update (initial norm when adaptive).",
                 shown=_default("clip_norm")),
]
SecureAgg = Annotated[
    bool | None,
    _option("--secure-agg/--no-secure-agg",
                 help="Flower's SecAgg+: the aggregator only sees the sum of masked updates.",
                 shown=_default("secure_agg")),
]
SecaggShares = Annotated[
    float | None,
    _option(help="SecAgg+ shares per site: a fraction of the sampled sites (<= 1) or a "
                 "count (>= 3).", shown=_default("secagg_shares")),
]
SecaggThreshold = Annotated[
    float | None,
    _option(help="SecAgg+ shares needed to rebuild a dropped site's mask: a fraction of the "
                 "shares (<= 1) or a count.", shown=_default("secagg_threshold")),
]
SecaggMaxWeight = Annotated[
    float | None,
    _option(help="SecAgg+ weight scale: about the largest site's training images (larger "
                 "sites count as this many).", shown=_default("secagg_max_weight")),
]
