"""Segmentation workloads of `make bench`: phantom organs, and real hippocampus MR when present.

    organ_dice          `medfed simulate --task segment` with defaults and --no-dp on `medfed
                        synth --masks anatomy` hospitals: the final central Dice, the mean over
                        the organ labels (body, right and left lung, heart, liver); the lesion
                        label's Dice and the mean over every label are reported beside it
    hippocampus_*       the MSD hippocampus set laid out as hospitals by ../shared/data/
                        make_sites.py (when that folder is there): Dice per class, with and
                        without DP, defaults otherwise

Each figure is one `medfed simulate` run: its own command, as a user would type it, in
`commands` of the part it belongs to.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
MEDFED = str(Path(sys.executable).with_name("medfed"))


def _run(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _simulate(
    data: Path, out: Path, rounds: int, env: dict[str, str], *extra: str
) -> tuple[dict[str, Any], str, float]:
    argv = [MEDFED, "simulate", "--task", "segment", "--data", str(data / "sites"),
            "--test-data", str(data / "test"), "--rounds", str(rounds), *extra, "--out", str(out),
            "--metrics-port", "0", "--force"]
    seconds = _run(argv, env)
    results = json.loads((out / "results.json").read_text())
    return results, _shown(argv), seconds


def _shown(argv: list[str]) -> str:
    """The command as a user in the repository would type it (relative paths, no bench flags)."""
    text = " ".join(a.replace(f"{ROOT}/", "") for a in argv[1:])
    return "medfed " + text.replace(" --metrics-port 0", "").replace(" --force", "")


def _scores(results: dict[str, Any]) -> dict[str, Any]:
    final = results["final"]
    per_class = {k: v for k, v in final.items() if k.startswith(("dice-c", "nsd-c"))}
    return {"dice": final.get("dice"), "iou": final.get("iou"), "hd95": final.get("hd95"),
            "nsd": final.get("nsd"), **per_class,
            "epsilon": max((p.get("epsilon") or 0.0
                            for p in results.get("privacy", {}).values()), default=0.0),
            "plan": results.get("plan", {}).get("choices", {})}


def organs(out: Path, *, sites: int, images: int, rounds: int, env: dict[str, str]
           ) -> dict[str, Any]:
    """Phantom organs (`medfed synth --masks anatomy`), no DP, medfed's defaults."""
    data = out / "organs-data"
    synth = [MEDFED, "synth", "--masks", "anatomy", "--sites", str(sites), "--images-per-site",
             str(images), "--seed", "0", "--out", str(data), "--force"]
    _run(synth, env)
    results, command, seconds = _simulate(data, out / "organs", rounds, env, "--no-dp")
    labels = json.loads((data / "dataset_info.json").read_text()).get("mask_labels", {})
    scores = _scores(results)
    organ = [scores.get(f"dice-c{k}") for k, name in labels.items()
             if k != "0" and name not in ("background", "lesion")]
    finite = [v for v in organ if isinstance(v, float) and v == v]
    return {"synth": _shown(synth), "command": command, "seconds": seconds,
            "labels": labels, **scores, "dice_all_labels": scores["dice"],
            "dice": sum(finite) / len(finite) if finite else float("nan")}


def hippocampus(out: Path, *, rounds: int, env: dict[str, str]) -> dict[str, Any]:
    """MSD hippocampus slices as hospitals: Dice per class without and with DP (defaults)."""
    script = SHARED / "make_sites.py"
    if not script.is_file():
        return {}
    data = out / "hippocampus-data"
    if not (data / "sites").is_dir():
        _run([sys.executable, str(script), "hippocampus", "--out", str(data)], env)
    part: dict[str, Any] = {"data": f"python ../{script.relative_to(ROOT.parent)} hippocampus "
                                    f"--out {data.relative_to(ROOT)}",
                            "runs": {}}
    for name, flags in (("no-dp", ("--no-dp",)), ("dp", ())):
        results, command, seconds = _simulate(data, out / f"hippocampus-{name}", rounds, env,
                                              *flags)
        part["runs"][name] = {"command": command, "seconds": seconds, **_scores(results)}
    return part


def markdown(part_organs: dict[str, Any], part_hc: dict[str, Any]) -> str:
    """The BENCHMARKS.md section of the segmentation figures."""
    lines = ["## Segmentation", ""]
    if part_organs:
        labels = part_organs.get("labels", {})
        per = ", ".join(
            f"{labels.get(k[len('dice-c'):], k)} {v:.3f}" for k, v in part_organs.items()
            if k.startswith("dice-c") and isinstance(v, float)
        )
        lines += [
            f"Phantom organs: `{part_organs['synth']}` then `{part_organs['command']}` "
            f"({part_organs['seconds'] / 60:.1f} minutes): **organ_dice {part_organs['dice']:.3f}**"
            f" (mean over the organ labels; over every label, lesion included, "
            f"{part_organs['dice_all_labels']:.3f}; HD95 {part_organs['hd95']:.2f} px, NSD "
            f"{part_organs['nsd']:.3f}); per label: {per}.", "",
        ]
    if part_hc.get("runs"):
        lines += [
            f"MSD hippocampus MR (Task04), sagittal slices laid out as hospitals by "
            f"`{part_hc['data']}`; reference: nnU-Net 3D, about 0.90 anterior and 0.89 posterior "
            "on the MSD test set.", "",
            "| run | Dice anterior | Dice posterior | mean | HD95 (px) | NSD | epsilon | minutes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, run in part_hc["runs"].items():
            lines.append(
                f"| {name}: `{run['command']}` | {run.get('dice-c1', float('nan')):.3f} | "
                f"{run.get('dice-c2', float('nan')):.3f} | {run['dice']:.3f} | "
                f"{run['hd95']:.2f} | {run['nsd']:.3f} | {run['epsilon']:.2f} | "
                f"{run['seconds'] / 60:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)
