"""The model card of a run: RUN_DIR/model_card.json and a self-contained model_card.html.

One idea, two steps: `collect` gathers the facts of a finished run into a dict (that dict is
model_card.json), and `render` (server.model_card_html) draws the HTML from that dict alone, so
the two never disagree.
The facts come from results.json (server.record: config, rounds, final metrics, privacy, the
cross-site matrix of server.cross_site, a segmentation run's plan) and, where the aggregator can
read them (a simulation: the sites' folders on this machine, a --test-data folder), the
labels.csv class counts the data cards (common.data.card) also count. A deployed aggregator
holds no site's labels: there the card says the class counts stay at the sites.

Sections: intended use and task; data (sites, examples per split, class counts per split where
known, input size and channels, the segmentation plan's image sizes); training (strategy,
rounds, local steps or epochs, network, privacy per site); performance (central test set,
per site from the cross-site matrix, worst site, calibration, operating point); limitations,
each a sentence drawn from those facts.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common.atomic import UMASK, write_text
from common.config import RunConfig
from common.cross_site import HIGHER_IS_BETTER
from common.data.errors import DataError
from common.data.labels import SPLITS, read_labels
from common.outputs import note, write_json, writing
from common.registry import Task
from server.model_card_html import render
from server.record import RESULTS, SITE_PLOT_METRIC

CARD_JSON = "model_card.json"
CARD_HTML = "model_card.html"
# a class with fewer images than this in a split gives figures too uncertain to lean on
FEW_EXAMPLES = 30
# a site whose main metric is this far below the mean over sites is named a limitation
BELOW_MEAN = 0.1
# what each task's model is for, filled with the run's settings
_USES: dict[str, str] = {
    Task.classify: "sorts {input} into {num_classes} classes (labels 0..{last})",
    Task.segment: "delineates {structures} structure(s) (mask labels 1..{last}; 0 is background) "
               "in {input}",
    Task.autoencode: "scores how unusual {input} are (reconstruction error; anomaly detection)",
    Task.synthesize: "generates synthetic {input} of {num_classes} classes (a conditional GAN)",
}
_CALIBRATION = ("ece", "brier")


# --- facts -------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def site_names(results: dict[str, Any]) -> list[str]:
    """Every site results.json names: trained, evaluated, failed, spent privacy, cross-site."""
    names: set[str] = set(results.get("privacy") or {})
    for entry in results.get("rounds") or []:
        names.update(((entry.get("federated") or {}).get("sites")) or {})
        names.update(entry.get("participants") or [])
        names.update(f["site"] for f in entry.get("failures") or [] if f.get("site") != "*")
    cross = results.get("cross_site") or {}
    names.update(cross.get("sites") or {})
    names.update(cross.get("failed") or {})
    names.update(((results.get("final") or {}).get("per_site")) or {})
    return sorted(names)


def _last_site_metric(results: dict[str, Any], site: str, stage: str, key: str) -> Any:
    for entry in reversed(results.get("rounds") or []):
        stats = ((((entry.get("federated") or {}).get("sites")) or {}).get(site) or {})
        value = (stats.get(stage) or {}).get(key)
        if value is not None:
            return value
    return None


def _class_counts(folder: Path, seed: int) -> dict[str, dict[str, int]] | None:
    """Labelled rows per split and class of a site folder's labels.csv (None: unreadable)."""
    try:
        rows = read_labels(folder, seed=seed)
    except (DataError, OSError):
        return None
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        found = Counter(r.label for r in rows if r.split == split and r.label is not None)
        counts[split] = {str(k): v for k, v in sorted(found.items())}
    return counts


def _site_data(results: dict[str, Any], sites: list[str], cfg: RunConfig) -> dict[str, Any]:
    cross = (results.get("cross_site") or {}).get("sites") or {}
    fingerprints = ((results.get("plan") or {}).get("fingerprints")) or {}
    root = Path(cfg.sites_dir) if cfg.sites_dir else None
    out: dict[str, Any] = {}
    for site in sites:
        folder = root / site if root is not None else None
        local = (folder is not None and (folder / "labels.csv").is_file())
        evaluated = cross.get(site) or {}
        out[site] = {
            "train_examples": _last_site_metric(results, site, "train", "num-examples"),
            "val_examples": _last_site_metric(results, site, "evaluate", "num-examples"),
            "cross_site_examples": evaluated.get("num-examples"),
            "cross_site_split": evaluated.get("split"),
            "classes_per_split": _class_counts(folder, cfg.seed) if local and folder else None,
            "fingerprint": fingerprints.get(site),
        }
    return out


def _data(results: dict[str, Any], sites: list[str], cfg: RunConfig) -> dict[str, Any]:
    per_site = _site_data(results, sites, cfg)
    known = any(s["classes_per_split"] is not None for s in per_site.values())
    central: dict[str, Any] | None = None
    if cfg.test_data:
        folder = Path(cfg.test_data)
        counts = _class_counts(folder, cfg.seed) if (folder / "labels.csv").is_file() else None
        central = {"source": "--test-data (every image, whatever its split)",
                   "classes": _merge_splits(counts) if counts is not None else None}
    elif (results.get("final") or {}).get("source") == "central":
        central = {"source": "the sites' test splits, read by the aggregator (simulation)",
                   "classes": None}
    return {
        "sites": per_site,
        "class_counts": (
            "labels.csv of each site folder the aggregator could read (simulation)" if known
            else "not known at the aggregator: each site's class counts stay at the site "
            "(its data card: `medfed check-data`)"
        ),
        "input": {"image_size": cfg.image_size, "channels": cfg.channels, "dims": cfg.dims,
                  "note": "every image is resampled to this size and channel count"},
        "modalities": ("not recorded at the aggregator: the images and their headers stay at "
                       "the sites (each site's data card lists its modalities)"),
        "plan": (results.get("plan") or {}).get("pooled"),
        "central_test": central,
    }


def _merge_splits(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for classes in counts.values():
        total.update(classes)
    return dict(sorted(total.items()))


def _training(results: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    outcome = results.get("outcome") or {}
    return {
        "strategy": cfg.strategy,
        "rounds_configured": cfg.rounds,
        "rounds_completed": len(results.get("rounds") or []),
        "rounds_trained": outcome.get("trained_rounds"),
        "local_epochs": cfg.local_epochs or None,
        "local_steps": None if cfg.local_epochs else cfg.local_steps,
        "batch_size": cfg.batch_size or "automatic",
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "network": {"model": cfg.model, "args": cfg.network_args()},
        "secure_aggregation": cfg.secure_agg,
        "privacy": {
            "dp": cfg.dp,
            "target_epsilon": cfg.target_epsilon if cfg.dp else None,
            "delta": cfg.delta if cfg.dp else None,
            "sites": results.get("privacy") or {},
            "central": results.get("central_privacy"),
        },
    }


def _performance(results: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    final = results.get("final") or {}
    cross = results.get("cross_site") or {}
    metric = SITE_PLOT_METRIC.get(cfg.task, "auc")
    summary = (cross.get("summary") or {}).get(metric) or {}
    worst = ({"metric": metric, "site": summary["worst_site"], "value": summary["worst"]}
             if "worst_site" in summary else None)
    point = final.get("operating_point")
    return {
        "main_metric": metric,
        "final": {k: v for k, v in final.items()
                  if k not in ("per_site", "fairness", "operating_point")},
        "source": final.get("source"),
        "cross_site": {
            "model": cross.get("model"),
            "round": cross.get("round"),
            "sites": cross.get("sites") or {},
            "summary": cross.get("summary") or {},
            "failed": cross.get("failed") or {},
            "skipped": cross.get("skipped"),
        },
        "worst_site": worst,
        "calibration": {k: final.get(k) for k in _CALIBRATION if k in final} or None,
        "operating_point": (
            {"threshold": final.get("threshold"), **(point or {})}
            if final.get("threshold") is not None else None
        ),
        "validation_per_site": final.get("per_site") or {},
    }


def _intended_use(cfg: RunConfig) -> dict[str, str]:
    size = f"{cfg.image_size} px" + (" volumes" if cfg.dims == 3 else " images")
    shown = f"{cfg.channels}-channel {size}"
    use = _USES.get(cfg.task, "{input}").format(
        input=shown, num_classes=cfg.num_classes, last=cfg.num_classes - 1,
        structures=max(cfg.num_classes - 1, 0),
    )
    return {
        "summary": f"Research use: a federated {cfg.model or cfg.task} that {use}.",
        "out_of_scope": (
            "Not a medical device and not validated for clinical decisions. Use it only on "
            "images like the sites' (modality, acquisition, population), after checking it on "
            "local labelled data."
        ),
    }


def _limitations(card: dict[str, Any], results: dict[str, Any], cfg: RunConfig) -> list[str]:
    out: list[str] = []
    outcome = results.get("outcome") or {}
    if not outcome.get("trained", False):
        out.append(f"The run trained no round ({outcome.get('reason') or 'no result'}): "
                   "there is no trained model to use.")
    done, total = card["training"]["rounds_completed"], cfg.rounds
    if done < total:
        out.append(f"Only {done} of the {total} configured rounds completed.")
    if not cfg.dp:
        out.append("Trained without differential privacy: nothing bounds what the model "
                   "reveals about the sites' training images.")
    perf = card["performance"]
    if outcome.get("trained", False) and perf["source"] != "central":
        out.append("There is no central test set: the headline figures are on the sites' "
                   "validation splits, which the run also used to choose its operating point, "
                   "so they are optimistic; the cross-site figures on the sites' test splits "
                   "are the independent estimate.")
    cross = perf["cross_site"]
    if cross["skipped"]:
        out.append(f"The final model was not evaluated across sites: {cross['skipped']}.")
    for site, reason in sorted(cross["failed"].items()):
        out.append(f"Site {site} did not evaluate the final model ({reason}): its performance "
                   "there is unknown.")
    metric = perf["main_metric"]
    for site, values in sorted(cross["sites"].items()):
        if values.get("split") != "test":
            out.append(f"Site {site} has no test split: its cross-site figures are on its "
                       "validation split, which the run evaluated every round.")
        if metric in values and _number(values[metric]) is None:
            out.append(f"The {metric} is undefined at site {site} (its evaluated split lacks "
                       "a class, or it holds no usable images).")
    summary = cross["summary"].get(metric) or {}
    mean = _number(summary.get("mean"))
    if mean is not None and metric in HIGHER_IS_BETTER and summary.get("sites", 0) > 1:
        for site, values in sorted(cross["sites"].items()):
            value = _number(values.get(metric))
            if value is not None and value < mean - BELOW_MEAN:
                out.append(f"At site {site} the {metric} is {value:.3f}, {mean - value:.3f} "
                           f"below the mean over sites ({mean:.3f}): the model serves that "
                           "site's patients less well.")
    out += _few_examples(card["data"])
    out += [f"Degenerate output: {w}" for w in results.get("warnings") or []]
    return out


def _few_examples(data: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for site, facts in sorted(data["sites"].items()):
        counts = facts.get("classes_per_split")
        if counts is not None:
            few = [f"{split} " + ", ".join(f"class {c}: {n}" for c, n in classes.items()
                                           if n < FEW_EXAMPLES)
                   for split, classes in counts.items()
                   if any(n < FEW_EXAMPLES for n in classes.values())]
            if few:
                out.append(f"Site {site} holds fewer than {FEW_EXAMPLES} images of some "
                           f"classes ({'; '.join(few)}): figures on them are uncertain.")
            continue
        examples = facts.get("cross_site_examples")
        if isinstance(examples, int) and examples < FEW_EXAMPLES:
            out.append(f"Site {site} evaluated the final model on {examples} images only "
                       f"(fewer than {FEW_EXAMPLES}): its figures are uncertain.")
    central = data.get("central_test") or {}
    few = [f"class {c}: {n}" for c, n in (central.get("classes") or {}).items()
           if n < FEW_EXAMPLES]
    if few:
        out.append(f"The central test set holds fewer than {FEW_EXAMPLES} images of some "
                   f"classes ({', '.join(few)}): its figures on them are uncertain.")
    return out


def collect(results: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """The model card's facts (model_card.json) from a run's results.json content."""
    cfg = RunConfig.from_mapping(results.get("config") or {}, strict=False)
    sites = site_names(results)
    outcome = results.get("outcome") or {}
    card: dict[str, Any] = {
        "card_version": 1,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": {
            "run_key": cfg.run_key, "started": results.get("started"),
            "status": outcome.get("status"), "reason": outcome.get("reason") or None,
            "results": RESULTS,
            "model_file": ("model.pt" if run_dir is not None and (run_dir / "model.pt").is_file()
                           else None),
        },
        "intended_use": _intended_use(cfg),
        "task": {"task": cfg.task, "model": cfg.model, "num_classes": cfg.num_classes},
        "sites": sites,
        "data": _data(results, sites, cfg),
        "training": _training(results, cfg),
        "performance": _performance(results, cfg),
        "warnings": list(results.get("warnings") or []),
    }
    card["limitations"] = _limitations(card, results, cfg)
    return card


def write_model_card(run_dir: Path) -> tuple[Path, Path]:
    """RUN_DIR/model_card.json and model_card.html from RUN_DIR/results.json; their paths.

    Raises OutputError naming the file when it cannot be written; ValueError when results.json
    is not a run's results.
    """
    try:
        results = json.loads((run_dir / RESULTS).read_text())
        if not isinstance(results, dict):
            raise ValueError("not a JSON object")
        card = collect(results, run_dir)
    except (OSError, ValueError) as exc:  # ConfigError too: a config results.json cannot hold
        raise ValueError(f"{run_dir / RESULTS}: no model card can be written from it "
                         f"({type(exc).__name__}: {exc}); check that it is a run's "
                         "results.json") from None
    json_path, html_path = run_dir / CARD_JSON, run_dir / CARD_HTML
    write_json(json_path, card)
    note(run_dir, json_path, html_path)
    with writing(html_path):
        write_text(html_path, render(card), permissions=UMASK)
    return json_path, html_path
