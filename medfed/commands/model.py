"""A run's model: `medfed predict`, `sample` and `audit-privacy`, and the `central` baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from common.config import RunConfig
from medfed.console import (
    err,
    guard,
    out,
)


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
