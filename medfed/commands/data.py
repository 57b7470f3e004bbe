"""`medfed synth` and `medfed check-data`: writing synthetic hospitals, checking a site's data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medfed import options as opt
from medfed.console import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    guard,
    out,
)


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
