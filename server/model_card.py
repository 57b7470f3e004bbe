"""The model card of a run: RUN_DIR/model_card.json and a self-contained model_card.html.

One idea, two steps: `collect` gathers the facts of a finished run into a dict (that dict is
model_card.json), and `render` draws the HTML from that dict alone, so the two never disagree.
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

import html
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.cross_site import HIGHER_IS_BETTER
from common.data.errors import DataError
from common.data.labels import SPLITS, read_labels
from common.outputs import note, writing
from server.record import RESULTS, SITE_PLOT_METRIC, write_json

CARD_JSON = "model_card.json"
CARD_HTML = "model_card.html"
# a class with fewer images than this in a split gives figures too uncertain to lean on
FEW_EXAMPLES = 30
# a site whose main metric is this far below the mean over sites is named a limitation
BELOW_MEAN = 0.1
# what each task's model is for, filled with the run's settings
_USES = {
    "classify": "sorts {input} into {num_classes} classes (labels 0..{last})",
    "segment": "delineates {structures} structure(s) (mask labels 1..{last}; 0 is background) "
               "in {input}",
    "autoencode": "scores how unusual {input} are (reconstruction error; anomaly detection)",
    "synthesize": "generates synthetic {input} of {num_classes} classes (a conditional GAN)",
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


# --- HTML --------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Any) -> str:
    """A value for a table cell, escaped; numbers as results.json has them, to 4 digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "–"
    if isinstance(value, dict):
        return _esc(", ".join(f"{k}: {_plain(v)}" for k, v in value.items()))
    if isinstance(value, list):
        return _esc(", ".join(_plain(v) for v in value))
    return _esc(value)


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "–"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) + "}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _facts(pairs: list[tuple[str, Any]]) -> str:
    return _table(["", ""], [[k, v] for k, v in pairs if v is not None])


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_esc(anchor)}"><h2>{_esc(title)}</h2>{body}</section>'


def _data_html(card: dict[str, Any]) -> str:
    data = card["data"]
    rows = []
    for site in card["sites"]:
        facts = data["sites"][site]
        counts = facts.get("classes_per_split")
        rows.append([site, facts.get("train_examples"), facts.get("val_examples"),
                     facts.get("cross_site_examples"), facts.get("cross_site_split"),
                     {s: c for s, c in counts.items()} if counts is not None else None])
    body = _table(["site", "train examples", "validation examples", "cross-site examples",
                   "cross-site split", "labelled rows per split and class"], rows)
    central = data.get("central_test") or {}
    body += _facts([
        ("class counts", data["class_counts"]),
        ("input", data["input"]),
        ("modalities", data["modalities"]),
        ("segmentation plan (pooled)", data.get("plan")),
        ("central test set", central.get("source") if central else "none"),
        ("central test classes", central.get("classes")),
    ])
    return _section("data", "Data", body)


def _training_html(card: dict[str, Any]) -> str:
    training = card["training"]
    privacy = training["privacy"]
    body = _facts([
        ("strategy", training["strategy"]),
        ("rounds", f"{training['rounds_completed']} completed of "
         f"{training['rounds_configured']} ({training['rounds_trained']} trained a site)"),
        ("local epochs", training["local_epochs"]),
        ("local steps", training["local_steps"]),
        ("batch size", training["batch_size"]),
        ("optimizer", f"{training['optimizer']}, lr {training['lr']:g}"),
        ("network", training["network"]),
        ("secure aggregation", training["secure_aggregation"]),
        ("differential privacy", (f"DP-SGD at each site, target epsilon "
                                  f"{privacy['target_epsilon']:g}, delta {privacy['delta']:g}"
                                  if privacy["dp"] else "none")),
        ("central (user-level) DP", privacy.get("central")),
    ])
    keys = ("epsilon", "validation_epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
            "accountant")
    rows = [[site, *((privacy["sites"].get(site) or {}).get(k) for k in keys)]
            for site in card["sites"]]
    body += _table(["site", *keys], rows)
    return _section("training", "Training", body)


def _performance_html(card: dict[str, Any]) -> str:
    perf = card["performance"]
    cross = perf["cross_site"]
    final = perf["final"]
    shown = [k for k, v in final.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    body = (f"<h3>Global model ({_esc(perf['source'])} evaluation)</h3>"
            + _table(["metric", "value"], [[k, final[k]] for k in shown])
            if perf["source"] else "<h3>Global model: not evaluated</h3>")
    if perf["calibration"]:
        body += "<h3>Calibration</h3>" + _facts(list(perf["calibration"].items()))
    if perf["operating_point"]:
        body += "<h3>Operating point</h3>" + _facts(list(perf["operating_point"].items()))
    metrics = sorted({k for v in cross["sites"].values() for k in v
                      if k not in ("split", "num-examples")})
    body += (f"<h3>Per site: the final model (round {_cell(cross['round'])}) on each site's own "
             "held-out split</h3>")
    if cross["skipped"]:
        return _section("performance", "Performance",
                        body + f"<p>Not evaluated: {_esc(cross['skipped'])}</p>")
    rows = [[site, (cross["sites"].get(site) or {}).get("split"),
             (cross["sites"].get(site) or {}).get("num-examples"),
             *((cross["sites"].get(site) or {}).get(m) for m in metrics)]
            for site in card["sites"] if site in cross["sites"]]
    for label in ("worst", "mean", "spread"):
        rows.append([label, None, None, *(cross["summary"].get(m, {}).get(label)
                                          for m in metrics)])
    rows.append(["worst site", None, None, *(cross["summary"].get(m, {}).get("worst_site")
                                             for m in metrics)])
    body += _table(["site", "split", "examples", *metrics], rows)
    if cross["failed"]:
        body += "<p>Sites that did not evaluate it:</p>" + _table(
            ["site", "reason"], [[s, r] for s, r in sorted(cross["failed"].items())])
    worst = perf["worst_site"]
    if worst:
        body += (f"<p>Worst site by {_esc(worst['metric'])}: <b>{_esc(worst['site'])}</b> "
                 f"({_cell(worst['value'])}).</p>")
    return _section("performance", "Performance", body)


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:0 16px;
color:#222} h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;margin-top:28px}
table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top} th{background:#f3f3f3} .note{color:#555}
li{margin:4px 0}
"""


def render(card: dict[str, Any]) -> str:
    """The card as one self-contained HTML document (no external asset; every string escaped)."""
    run = card["run"]
    use = card["intended_use"]
    task = card["task"]
    limits = "".join(f"<li>{_esc(s)}</li>" for s in card["limitations"]) or "<li>none found</li>"
    sections = [
        _section("use", "Intended use and task",
                 f"<p>{_esc(use['summary'])}</p><p class=note>{_esc(use['out_of_scope'])}</p>"
                 + _facts([("task", task["task"]), ("model", task["model"]),
                           ("classes", task["num_classes"]),
                           ("sites", f"{len(card['sites'])}: {', '.join(card['sites'])}")])),
        _data_html(card),
        _training_html(card),
        _performance_html(card),
        _section("limitations", "Limitations", f"<ul>{limits}</ul>"),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>medfed model card: {_esc(run['run_key'] or task['task'])}</title>"
        f"<style>{CSS}</style></head><body><h1>Model card</h1>"
        f"<p class=note>run {_esc(run['run_key'])} &middot; started {_esc(run['started'])} "
        f"&middot; {_esc(run['status'])} &middot; from {_esc(run['results'])}, generated "
        f"{_esc(card['generated'])}</p>{''.join(sections)}</body></html>\n"
    )


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
    tmp = html_path.with_name(f".{html_path.name}.tmp")
    with writing(html_path):
        tmp.write_text(render(card), encoding="utf-8")
        tmp.replace(html_path)
    return json_path, html_path
