"""Training options shared by `medfed simulate` and `medfed run`: one definition, one help text.

Each is None when not given, so that the run's defaults (common.config.RunConfig, or the Flower
App's run config) apply and a resumed run keeps its own values.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Strategy(StrEnum):
    """Aggregation strategies (Flower's)."""

    fedavg = "fedavg"
    fedprox = "fedprox"
    fedadam = "fedadam"
    fedyogi = "fedyogi"
    fedmedian = "fedmedian"
    fedtrimmedavg = "fedtrimmedavg"
    krum = "krum"


class Task(StrEnum):
    """What the federation learns."""

    classify = "classify"
    segment = "segment"
    autoencode = "autoencode"
    synthesize = "synthesize"


TaskOpt = Annotated[
    Task | None,
    typer.Option(help="classify (labels), segment (masks: U-Net), autoencode (no labels needed) "
                 "or synthesize (DP conditional GAN). [default: classify]"),
]
InitEncoder = Annotated[
    Path | None,
    typer.Option(help="With --task classify: a finished --task autoencode run folder whose "
                 "encoder initialises the classifier (federated pretraining)."),
]
EncoderLrScale = Annotated[
    float | None,
    typer.Option(help="With --task classify: the feature blocks' learning rate as a multiple of "
                 "--lr; 0 freezes them and only the head trains. [default: 1]"),
]
SpotWeight = Annotated[
    float | None,
    typer.Option(help="With --task autoencode: weight of the spot term, which teaches the encoder "
                 "where lesions are (0.1 for an encoder to pass to --init-encoder; 0: "
                 "reconstruction only, the better anomaly score under DP). [default: 0]"),
]
NumClasses = Annotated[
    int | None,
    typer.Option(help="Classes (classify, synthesize) or mask labels incl. background (segment). "
                 "[default: 2]"),
]
TestData = Annotated[
    Path | None, typer.Option(help="Held-out folder; every image in it is a test image.")
]
Rounds = Annotated[int | None, typer.Option(help="Federated rounds. [default: 5]")]
StrategyOpt = Annotated[
    Strategy | None, typer.Option(help="Aggregation strategy. [default: fedavg]")
]
Dp = Annotated[
    bool | None, typer.Option("--dp/--no-dp", help="DP-SGD at every site. [default: --dp]")
]
TargetEpsilon = Annotated[
    float | None, typer.Option(help="Each site's epsilon for the whole run. [default: 8]")
]
Delta = Annotated[float | None, typer.Option(help="DP delta. [default: 1e-5]")]
MaxGradNorm = Annotated[
    float | None, typer.Option(help="Per-sample gradient clipping norm. [default: 1.0]")
]
LocalEpochs = Annotated[int | None, typer.Option(help="Local epochs per round. [default: 1]")]
FractionTrain = Annotated[
    float | None, typer.Option(help="Share of sites sampled per round. [default: 1.0]")
]
Seed = Annotated[int | None, typer.Option(help="Seed. [default: 0]")]
BatchSize = Annotated[int | None, typer.Option(help="Local batch size. [default: 32]")]
Lr = Annotated[float | None, typer.Option(help="Local learning rate. [default: 3e-4]")]
ImageSize = Annotated[int | None, typer.Option(help="Model input size. [default: 64]")]
MinSites = Annotated[int | None, typer.Option(help="Fewest sites a round needs. [default: 2]")]
ProximalMu = Annotated[
    float | None, typer.Option(help="FedProx mu (with --strategy fedprox). [default: 0.01]")
]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N. [default: auto]")]


def budget_flag(value: float | None) -> float | None:
    """--budget-epsilon: a finite epsilon > 0 when given (usage error, exit 2, otherwise)."""
    from common.config import ConfigError, check_budget

    try:
        return None if value is None else check_budget(value, "--budget-epsilon")
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


BudgetEpsilon = Annotated[
    float | None,
    typer.Option(help="Privacy budget of each site's dataset over ALL runs; a round that would "
                 "exceed it is refused. Default: none.", callback=budget_flag),
]
LedgerDir = Annotated[
    Path | None,
    typer.Option(help="Where sites keep their privacy ledgers (default: $MEDFED_LEDGER_DIR, else "
                 "~/.medfed/ledger)."),
]
ScreenZ = Annotated[
    float | None,
    typer.Option(help="Reject an update whose norm's robust z-score is above this, e.g. 3.5 "
                 "(NaN/Inf, key, shape and dtype checks always run). Default: off."),
]
CentralDp = Annotated[
    str | None,
    typer.Option(help="User-level DP at the aggregator (Flower's wrappers): off, server-fixed, "
                 "client-fixed, server-adaptive or client-adaptive. Combine with --no-dp for "
                 "central DP alone. Default: off."),
]
CentralNoise = Annotated[
    float | None,
    typer.Option(help="Central DP noise multiplier (default: calibrated so --rounds releases "
                 "spend --target-epsilon)."),
]
ClipNorm = Annotated[
    float | None,
    typer.Option(help="Central DP clipping norm of a site's update (initial norm when adaptive). "
                 "Default: 1.0."),
]
SecureAgg = Annotated[
    bool | None,
    typer.Option("--secure-agg/--no-secure-agg",
                 help="Flower's SecAgg+: the aggregator only sees the sum of masked updates. "
                 "Default: off."),
]
SecaggShares = Annotated[
    float | None,
    typer.Option(help="SecAgg+ shares per site: a fraction of the sampled sites (<= 1) or a "
                 "count (>= 3). Default: 1.0."),
]
SecaggThreshold = Annotated[
    float | None,
    typer.Option(help="SecAgg+ shares needed to rebuild a dropped site's mask: a fraction of the "
                 "shares (<= 1) or a count. Default: 0.6."),
]
SecaggMaxWeight = Annotated[
    float | None,
    typer.Option(help="SecAgg+ weight scale: about the largest site's training images (larger "
                 "sites count as this many). Default: 1000."),
]
