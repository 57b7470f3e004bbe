"""The `medfed` command line: data, simulation and baselines; deployment is in medfed.deploy.

Exit codes are documented in medfed.console (0 ok, 1 failed, 2 bad input, 3 refused).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from common.config import ConfigError, RunConfig
from common.logs import settle_known_warnings
from medfed import deploy
from medfed import options as opt
from medfed.console import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    err,
    given,
    guard,
    out,
    print_results,
    state,
)

if TYPE_CHECKING:
    from server.exporter import MetricsSettings
    from server.run import ProgressFn
    from simulations.scenario import Federation

app = typer.Typer(
    name="medfed",
    help=(
        "Federated learning for medical imaging: train one model across hospitals without "
        "moving images. Exit codes: 0 ok, 1 run failed, 2 bad input or usage, "
        "3 refused by policy."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(deploy.provision_app, name="provision")
app.add_typer(deploy.site_app, name="site")
app.command()(deploy.server)
app.command("run")(deploy.run)
app.command()(deploy.runs)
app.command()(deploy.stop)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option(help="Show full tracebacks on errors.")] = False,
) -> None:
    state["debug"] = debug


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write sites/ and test/ to.")],
    sites: Annotated[
        int | None,
        typer.Option(help="Number of hospital sites.", show_default="4, or one per --site-sizes"),
    ] = None,
    images_per_site: Annotated[int, typer.Option(help="Average images per site.")] = 200,
    test_images: Annotated[
        int | None,
        typer.Option(help="Held-out test images.", show_default="max(200, 2 x per site)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same files.")] = 0,
    force: Annotated[
        bool,
        typer.Option(help="Replace the synthetic data medfed wrote in --out (sites/, test/, "
                          "identifiers.json); other files stay."),
    ] = False,
    labelled_fraction: Annotated[
        float,
        typer.Option(help="Share of each site's training rows that keep their label; the rest "
                          "get an empty label (unlabelled)."),
    ] = 1.0,
    site_sizes: Annotated[
        str | None,
        typer.Option(help="Images of each site, comma-separated, e.g. 30,80,600,1500 (tiny "
                          "clinics beside large hospitals); replaces --images-per-site's "
                          "0.5-1.5x spread.", show_default="--images-per-site x 0.5..1.5"),
    ] = None,
    one_class_sites: Annotated[
        int,
        typer.Option(help="The last K sites hold one class only: normal, lesion, normal, ... "
                          "in turn (referral and screening clinics)."),
    ] = 0,
    label_alpha: Annotated[
        float | None,
        typer.Option(help="Dirichlet label skew: each mixed site's lesion share ~ "
                          "Beta(alpha, alpha); small alpha (0.3): sites dominated by one class.",
                     show_default="shares spread over 15%-60%"),
    ] = None,
    test_prevalence: Annotated[
        float | None,
        typer.Option(help="Lesion share of the held-out test set, in (0, 1), e.g. 0.2 to test "
                          "at another prevalence than training's.", show_default="0.5"),
    ] = None,
    masks: Annotated[
        str,
        typer.Option(help="What the NIfTI masks hold: 'lesion' (1 in the lung nodule) or "
                          "'anatomy' (label maps: 0 background, 1 body, 2 right lung, 3 left "
                          "lung, 4 heart, 5 liver, 6 lesion; listed in DIR/dataset_info.json)."),
    ] = "lesion",
    dims: Annotated[
        int,
        typer.Option(help="2: one image per DICOM file; 3: one axial CT or MR volume per "
                          "patient (a DICOM series folder per labels.csv row, 32-48 slices of "
                          "64-96 pixels, 3-5 mm apart) with a 3D NIfTI mask."),
    ] = 2,
) -> None:
    """Write synthetic hospitals: DICOM images, NIfTI masks, labels.csv per site.

    Hard layouts for developing against: --site-sizes, --one-class-sites, --label-alpha and
    --test-prevalence (see simulations/scenarios/hard.toml). Segmentation of anatomy:
    --masks anatomy, in 2D or --dims 3.
    """
    from simulations.synth import synthesize

    sizes = guard(lambda: _site_sizes(site_sizes))
    n_sites = sites if sites is not None else len(sizes) if sizes is not None else 4
    summary = guard(
        lambda: synthesize(
            out_dir, sites=n_sites, images_per_site=images_per_site, seed=seed,
            test_images=test_images, overwrite=force, labelled_fraction=labelled_fraction,
            site_sizes=sizes, one_class_sites=one_class_sites, label_alpha=label_alpha,
            test_prevalence=test_prevalence, masks=masks, dims=dims,
        )
    )
    table = Table("site", "images", "lesion share", title=f"Synthetic hospitals in {out_dir}")
    for name in summary.sites:
        table.add_row(name, str(summary.images[name]), f"{summary.positives[name]:.0%}")
    out.print(table)
    out.print(
        f"held-out test set: {summary.test_images} images "
        f"({summary.test_positives / summary.test_images:.0%} lesions) in {out_dir / 'test'}"
    )
    if masks == "anatomy":
        from simulations.anatomy import NUM_CLASSES

        out.print(f"masks: label maps of {NUM_CLASSES} classes (--num-classes {NUM_CLASSES}), "
                  f"listed in {out_dir / 'dataset_info.json'}")
    out.print(f"next: medfed check-data {out_dir / 'sites' / summary.sites[0]}")


def _site_sizes(text: str | None) -> list[int] | None:
    """--site-sizes 30,80,600 -> [30, 80, 600]; anything else is a ValueError naming the flag."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--site-sizes must be whole numbers separated by commas (e.g. 30,80,600,1500), "
            f"got {text!r}"
        ) from None


@app.command("check-data")
def check_data(
    site_dir: Annotated[Path, typer.Argument(help="A site folder holding labels.csv.")],
    image_size: Annotated[int, typer.Option(help="Model input size to check against.")] = 64,
    channels: Annotated[int, typer.Option(help="Model input channels (1 or 3).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the data card as JSON.")] = False,
    num_classes: Annotated[
        int | None,
        typer.Option(min=2, help="The run's classes: every label (and mask value) must be "
                     "0..N-1. \\[default: not checked]"),
    ] = None,
    task: opt.TaskOpt = None,
) -> None:
    """Check a site's images and print its data card; exit 0 if usable, 2 if not.

    Also checks each listed mask against its image (geometry, grid, NaN, values) and looks for
    the same image in two splits. With --task, usability is judged for that task.
    """
    from common.data import Preprocess, check_site

    card = guard(
        lambda: check_site(
            site_dir, Preprocess(image_size=image_size, channels=channels),
            task=task.value if task is not None else None, num_classes=num_classes,
            # as training reads them: only segmentation (or a general check) reads masks
            masks=task is None or task.value == "segment",
        )
    )
    if as_json:
        print(json.dumps(card.to_dict(), indent=2))
    else:
        typer.echo(card.to_text())
    raise typer.Exit(EXIT_OK if card.usable else EXIT_BAD_INPUT)


@app.command()
def simulate(
    data: Annotated[
        Path | None, typer.Option(help="Folder holding one folder per site (each with labels.csv).")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Run folder to write.",
                     show_default="a new runs/YYYYMMDD-HHMMSS folder"),
    ] = None,
    test_data: opt.TestData = None,
    task: opt.TaskOpt = None,
    model: opt.ModelOpt = None,
    channels: opt.Channels = None,
    init_encoder: opt.InitEncoder = None,
    encoder_lr_scale: opt.EncoderLrScale = None,
    spot_weight: opt.SpotWeight = None,
    num_classes: opt.NumClasses = None,
    rounds: opt.Rounds = None,
    strategy: opt.StrategyOpt = None,
    dp: opt.Dp = None,
    target_epsilon: opt.TargetEpsilon = None,
    delta: opt.Delta = None,
    max_grad_norm: opt.MaxGradNorm = None,
    local_epochs: opt.LocalEpochs = None,
    local_steps: opt.LocalSteps = None,
    logit_adjust: opt.LogitAdjust = None,
    augment: opt.Augment = None,
    cross_site: opt.CrossSite = None,
    net_width: opt.NetWidth = None,
    net_depth: opt.NetDepth = None,
    dims: opt.Dims = None,
    patch_size: opt.PatchSize = None,
    target_sensitivity: opt.TargetSensitivity = None,
    pretrained: opt.Pretrained = None,
    fraction_train: opt.FractionTrain = None,
    seed: opt.Seed = None,
    batch_size: opt.BatchSize = None,
    lr: opt.Lr = None,
    image_size: opt.ImageSize = None,
    min_sites: opt.MinSites = None,
    proximal_mu: opt.ProximalMu = None,
    device: opt.Device = None,
    budget_epsilon: opt.BudgetEpsilon = None,
    ledger_dir: opt.LedgerDir = None,
    screen_z: opt.ScreenZ = None,
    central_dp: opt.CentralDp = None,
    central_noise: opt.CentralNoise = None,
    clip_norm: opt.ClipNorm = None,
    secure_agg: opt.SecureAgg = None,
    secagg_shares: opt.SecaggShares = None,
    secagg_threshold: opt.SecaggThreshold = None,
    secagg_max_weight: opt.SecaggMaxWeight = None,
    scenario: Annotated[
        Path | None,
        typer.Option(
            help="Scenario TOML (sites, data partition, faults, resources, run settings; see "
            "simulations/scenarios/README.md). Flags given here override it."
        ),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue a run from its last checkpoint.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Replace a run already in --out: deletes only the files medfed wrote "
                          "there (RUN_DIR/.medfed-run.json); your own files stay."),
    ] = False,
    verbose: Annotated[
        bool, typer.Option(help="Show Flower's and Ray's logs (sites' tracebacks included).")
    ] = False,
    metrics_port: Annotated[
        int,
        typer.Option(
            min=0, max=65535,
            help="Port of the live dashboard (/) and Prometheus metrics (/metrics); 0 turns "
            "both off.",
        ),
    ] = 9400,
    metrics_host: Annotated[
        str,
        typer.Option(
            help="Address the dashboard listens on: 127.0.0.1 is this machine only, 0.0.0.0 "
            "every network interface."
        ),
    ] = "127.0.0.1",
) -> None:
    """Simulate a federation: every site folder under --data becomes a virtual hospital.

    While it runs, http://127.0.0.1:9400/ shows the rounds, the global model's curves and each
    site's privacy spend; Prometheus scrapes /metrics on the same port.
    """
    from server.exporter import MetricsSettings
    from simulations.runner import resume_config
    from simulations.scenario import Federation, Scenario

    overrides = given(
        sites_dir=str(data) if data else None, out=str(out_dir) if out_dir else None,
        test_data=str(test_data) if test_data else None, task=task, model=model, channels=channels,
        init_encoder=str(init_encoder.resolve()) if init_encoder else None,
        encoder_lr_scale=encoder_lr_scale, spot_weight=spot_weight,
        num_classes=num_classes, rounds=rounds, strategy=strategy,
        dp=dp, target_epsilon=target_epsilon, delta=delta, max_grad_norm=max_grad_norm,
        local_epochs=local_epochs, local_steps=local_steps, logit_adjust=logit_adjust,
        augment=augment, cross_site=cross_site, net_width=net_width, net_depth=net_depth,
        dims=dims, patch_size=patch_size,
        target_sensitivity=target_sensitivity,
        pretrained=str(pretrained.resolve()) if pretrained else None,
        fraction_train=fraction_train, seed=seed,
        batch_size=batch_size, lr=lr, image_size=image_size, min_sites=min_sites,
        proximal_mu=proximal_mu, device=device, budget_epsilon=budget_epsilon,
        ledger_dir=str(ledger_dir) if ledger_dir else None, screen_z=screen_z,
        central_dp=central_dp, central_noise=central_noise, clip_norm=clip_norm,
        secure_agg=secure_agg, secagg_shares=secagg_shares, secagg_threshold=secagg_threshold,
        secagg_max_weight=secagg_max_weight,
    )

    def build() -> tuple[RunConfig, Federation | None]:
        if resume is not None:
            if scenario is not None:
                raise ConfigError(
                    "--scenario and --resume together: a resumed run keeps the scenario it was "
                    "started with (RUN_DIR/scenario.json); drop --scenario"
                )
            return resume_config(resume, overrides), Federation.saved(resume)
        if scenario is not None:
            loaded = Scenario.load(scenario)
            run_cfg = loaded.config(overrides)
            if not run_cfg.sites_dir:
                raise ConfigError(f"{scenario}: set data.path in the scenario, or pass --data")
            if "out" not in loaded.run and out_dir is None:
                raise ConfigError(f"{scenario}: set run.out in the scenario, or pass --out")
            return run_cfg, loaded.federation
        if data is None:
            raise ConfigError("--data is required (or --resume RUN_DIR)")
        if out_dir is None:  # a new folder per run: a second run never meets the first's files
            overrides["out"] = str(_new_run_dir())
        return RunConfig.from_mapping(overrides), None

    cfg, federation = guard(build)
    # Name the run here, so that the dashboard and the run's files show the same id.
    cfg = cfg.replace(run_key=cfg.run_key or uuid.uuid4().hex)
    settings = guard(lambda: MetricsSettings(port=metrics_port, host=metrics_host))
    # before Ray starts its workers, which inherit the filters' "explained" mark (common.logs);
    # without --verbose the workers' output, warnings included, is not shown at all
    settle_known_warnings(
        (lambda line: err.print(line, highlight=False, markup=False)) if verbose else None
    )
    results = guard(
        lambda: _simulate_with_metrics(
            cfg, resume is not None, verbose, force, settings, federation
        )
    )
    code = print_results(results, Path(cfg.out))
    _write_report_after_run(Path(cfg.out))
    if code:  # the run ended but its last round trained no site: 3 refused, 1 failed
        raise typer.Exit(code)


def _new_run_dir(root: Path = Path("runs")) -> Path:
    """A run folder that does not exist yet: runs/YYYYMMDD-HHMMSS, suffixed if taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def _write_report_after_run(run_dir: Path) -> None:
    """The run's HTML report; a report that cannot be written never fails a finished run."""
    from common.outputs import note
    from simulations.report import write_report

    try:
        path = write_report(run_dir)
        note(run_dir, path)
        out.print(f"report:  {path}")
    except Exception as exc:  # the run itself succeeded: say so and how to retry
        err.print(
            f"[yellow]warning:[/] report not written ({type(exc).__name__}: {exc}); "
            f"retry with `medfed report {run_dir}`",
            highlight=False,
        )


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (the --out of `simulate`).")],
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="HTML file to write.", show_default="RUN_DIR/report.html"),
    ] = None,
) -> None:
    """Write a run's self-contained HTML report: metrics, sites, privacy, fairness, failures."""
    from simulations.report import write_report

    path = guard(lambda: write_report(run_dir, out_file))
    out.print(f"report: {path}")


def _simulate_with_metrics(
    cfg: RunConfig,
    resume: bool,
    verbose: bool,
    force: bool,
    settings: MetricsSettings,
    federation: Federation | None = None,
) -> dict[str, Any]:
    """Run the simulation with the dashboard and /metrics up for its whole length."""
    from server.exporter import serve_metrics
    from server.record import checkpoint_state
    from simulations.runner import simulate
    from simulations.scenario import Federation
    from simulations.sites import simulated_sites

    federation = federation or Federation()
    run_simulation = functools.partial(simulate, federation=federation)
    # Bad --data (or a bad scenario) is reported as such, before a port is taken.
    sites = simulated_sites(cfg, federation, Path(cfg.out).resolve()).names
    with serve_metrics(settings) as server:
        if server is None:
            return _run_with_progress(cfg, resume, verbose, force, run_simulation)
        metrics = server.metrics
        metrics.start_run(
            run_id=cfg.run_key, task=cfg.task, strategy=cfg.strategy, total_rounds=cfg.rounds,
            dp=cfg.dp, target_epsilon=cfg.target_epsilon, sites=sites,
        )
        if resume:
            metrics.replay(checkpoint_state(Path(cfg.out))["rounds"], cfg.rounds)
        err.print(f"dashboard: {server.url}  (Prometheus: {server.url}metrics)", highlight=False)
        ok = False
        try:
            results = _run_with_progress(
                cfg, resume, verbose, force, run_simulation, also=metrics.observe
            )
            ok = True
            return results
        finally:
            metrics.finish(ok=ok)


@app.command()
def central(
    data: Annotated[Path, typer.Option(help="Folder holding one folder per site.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write central.json to.")],
    test_data: Annotated[
        Path | None, typer.Option(help="Held-out folder; every image in it is a test image.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs over the pooled data.")] = 15,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-4,
    image_size: Annotated[int, typer.Option(help="Model input size.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Centralised baseline: train the same model on all sites' images pooled (no DP)."""
    from simulations.central import train_central

    def run() -> dict[str, Any]:
        _need_folder(out_dir)
        cfg = RunConfig(
            sites_dir=str(data), test_data=str(test_data) if test_data else "", out=str(out_dir),
            batch_size=batch_size, lr=lr, image_size=image_size, seed=seed, device=device,
        )
        return train_central(cfg, epochs=epochs)

    result = guard(run)
    final = result["final"]
    out.print(
        f"central baseline after {epochs} epochs on {result['train_images']} images: "
        f"AUC {final['auc']:.4f}, accuracy {final['accuracy']:.4f} "
        f"({result['test_images']} test images)"
    )
    out.print(f"results: {out_dir / 'central.json'}")


@app.command()
def sample(
    run_dir: Annotated[Path, typer.Argument(help="A finished `--task synthesize` run folder.")],
    n: Annotated[int, typer.Option("--n", help="Images to generate (classes in turn).")] = 100,
    out_dir: Annotated[Path, typer.Option("--out", help="Site folder to write.")] = Path(
        "data/synthetic"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the generator's noise.")] = 0,
) -> None:
    """Write a GAN run's generated images as synthetic DICOM in the site layout (labels.csv)."""
    from server.sample import write_samples

    guard(lambda: _need_folder(out_dir))
    counts = guard(lambda: write_samples(run_dir, out_dir, n=n, seed=seed))
    shown = ", ".join(f"class {c}: {k}" for c, k in counts.items())
    out.print(f"{n} synthetic images ({shown}) in {out_dir}")
    out.print(f"next: medfed check-data {out_dir}")


def _need_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(
            f"--out {out_dir} is a file, not a folder; give a folder path (it is created when "
            "missing)"
        )


@app.command()
def predict(
    model: Annotated[
        Path, typer.Argument(help="A finished run folder (with model.pt), or a model.pt.")
    ],
    data: Annotated[
        Path,
        typer.Option(help="A site folder (labels.csv: predictions are also scored) or a folder "
                          "of DICOM files, DICOM series folders or NIfTI files."),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for predictions.csv and the maps and DICOM.")
    ],
    explain: Annotated[
        bool,
        typer.Option(help="Classifiers: Grad-CAM saliency maps (NIfTI) and DICOM Secondary "
                          "Captures with the map overlaid; --no-explain writes scores only."),
    ] = True,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Slices per forward pass.")] = 32,
    force: Annotated[
        bool, typer.Option(help="Replace the predictions already in --out.")
    ] = False,
) -> None:
    """Apply a trained model to new images at the site; every output stays in --out.

    Writes OUT/predictions.csv (one row per image or volume), NIfTI maps on each image's grid,
    DICOM SEG (segmenters) or Secondary Captures (classifiers) that reference their source
    study, OUT/metrics.json when --data has labels, and OUT/summary.json (what was skipped).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from client.predict.run import clear_outputs
    from client.predict.run import predict as run_predict
    from client.predict.writer import PREDICTIONS

    def check_out() -> None:
        _need_folder(out_dir)
        if (out_dir / PREDICTIONS).exists() and not force:
            raise FileExistsError(
                f"--out {out_dir} already holds {PREDICTIONS}; pass --force to replace it or "
                "choose another folder"
            )
        if force:
            clear_outputs(out_dir)

    guard(check_out)
    with Progress(TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(),
                  console=err, transient=False) as progress:
        bar = progress.add_task("images", total=None)
        summary = guard(lambda: run_predict(
            model, data, out_dir, explain=explain, device=device, batch_size=batch_size,
            on_start=lambda n: progress.update(bar, total=n),
            advance=lambda n: progress.advance(bar, n),
        ))
    for skipped in summary.skipped:
        err.print(f"[yellow]skipped:[/] {skipped['path']}: {skipped['reason']}",
                  highlight=False)
    for warning in summary.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if summary.metrics is not None:
        shown = ("auc", "sensitivity", "specificity", "dice", "hd95")
        said = ", ".join(f"{k} {summary.metrics[k]:.3f}" for k in shown
                         if isinstance(summary.metrics.get(k), float))
        out.print(f"metrics: {said}")
    out.print(f"{summary.predicted} images predicted, {len(summary.skipped)} skipped; "
              f"results: {out_dir / PREDICTIONS}")


@app.command("audit-privacy")
def audit_privacy(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (with model.pt).")],
    data: Annotated[Path, typer.Option(help="The sites' folders the run trained on.")],
    seed: Annotated[int, typer.Option(help="Seed of the member/non-member balancing.")] = 0,
) -> None:
    """Membership-inference attack on a run's model: does it give its training images away."""
    from common.outputs import note
    from simulations.privacy_audit import AUDIT_FILE
    from simulations.privacy_audit import audit_privacy as attack

    result = guard(lambda: attack(run_dir, data, seed=seed))
    note(run_dir, run_dir / AUDIT_FILE)  # --force on the run folder replaces it with the run
    table = Table("site", "attack AUC", "members", "non-members", "loss in / out",
                  title="Loss-threshold membership inference (0.5 = no better than chance)")
    for name, site in result["sites"].items():
        table.add_row(
            name, f"{site['attack_auc']:.3f}", str(site["members"]), str(site["non_members"]),
            f"{site['member_loss']:.3f} / {site['non_member_loss']:.3f}",
        )
    out.print(table)
    privacy = f"DP, epsilon {result['target_epsilon']:g}" if result["dp"] else "no DP"
    out.print(f"attack AUC {result['attack_auc']:.3f} over all sites ({privacy})")
    out.print(f"written: {run_dir / AUDIT_FILE}")


def _run_with_progress(
    cfg: RunConfig,
    resume: bool,
    verbose: bool,
    force: bool,
    run: Callable[..., dict[str, Any]],
    also: ProgressFn | None = None,
) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from server.run import RoundUpdate

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    privacy = f"DP-SGD, epsilon {cfg.target_epsilon:g}" if cfg.dp else "no DP"
    err.print(f"medfed: {cfg.strategy}, {cfg.rounds} rounds, {privacy}; writing {cfg.out}")
    with Progress(
        TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        console=err, transient=False,
    ) as progress:
        task = progress.add_task("rounds", total=cfg.rounds, status="starting sites...")
        reported: set[tuple[str, str, str, str]] = set()

        def on_round(update: RoundUpdate) -> None:
            central = update.entry.get("central") or {}
            fed = update.entry["federated"]["evaluate"]
            status = ""
            for key in ("auc", "dice", "anomaly_auroc", "anomaly-auroc", "fid"):
                value = central.get(key, fed.get(key))
                if isinstance(value, float):
                    status = f"{key} {value:.3f}"
                    break
            failures = [f for f in update.entry["failures"] if f.get("site") != "*"]
            status += f", {len(update.entry['participants'])} sites"
            status += f", {len(failures)} failed" if failures else ""
            progress.update(task, completed=update.round, status=status)
            for f in failures:  # each site's reason once, above the bar, not every round
                said = (f["site"], f["stage"], f["kind"], f["reason"])
                if said not in reported:
                    reported.add(said)
                    progress.console.print(
                        f"round {update.round}: site {f['site']} {f['stage']} {f['kind']}: "
                        f"{f['reason']}", highlight=False, markup=False,
                    )
            if also is not None:
                also(update)

        return run(cfg, resume=resume, on_round=on_round, quiet=not verbose, force=force)


def main() -> None:
    """Entry point of the `medfed` script."""
    try:
        app()
    except SystemExit as exc:
        # click reports usage errors with exit code 2 already; keep codes as they are.
        sys.exit(exc.code)
