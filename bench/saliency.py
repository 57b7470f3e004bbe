"""The pointing game of saliency methods on a run's classifier: how predict chose its map.

client/predict/saliency.py's choice rests on this table:

    PYTHONPATH=$PWD python -m bench.saliency RUN_DIR TEST_DIR
    PYTHONPATH=$PWD python -m bench.saliency --phantom-seeds 8

The first form takes a run's classifier; the second trains CNNClassifiers in-process as
tests/client/test_saliency.py does (CT phantoms drawn at 192 px, 400 for training, 400 held out),
one per seed, on bright lesions and on the same images inverted (dark lesions).

RUN_DIR holds a classifier's model.pt, TEST_DIR a labelled folder with masks (`medfed synth`'s
test/). For every lesion image (label 1 with a mask), each method's map of class 1 on the model
grid is brought back to the source grid as `medfed predict` does (bilinear, align_corners=False,
onto the padded square, padding removed); a hit is a maximum within 2 source px of the lesion
mask (issue 21). Printed: the hit rate over all lesion images, per modality, and over the images
the model calls positive (p > 0.5) and negative.
"""

from __future__ import annotations

import argparse
import copy
import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from scipy import ndimage
from torch import nn

from client.predict.saliency import (
    evidence_map,
    gaussian_blur,
    input_gradient,
    normalised,
    saliency_maps,
)
from common.data.image import decode_mask, load_image
from common.data.preprocess import Preprocess
from common.modelfile import load_model_file
from models import build_model

TOLERANCE_PX = 2.0
FLOOR = 0.05  # LayerCAM product fusion: each level's [0, 1] map + this before multiplying


def lesion_images(data: Path, size: int) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """Model inputs (N, C, size, size), source-grid masks, modalities of the lesion images."""
    images, masks, modalities = [], [], []
    with (data / "labels.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["label"] == "1" and r.get("mask")]
    for row in rows:
        image = load_image(data / row["path"], Preprocess(image_size=size))
        meta = image.meta
        side = max(meta.rows, meta.cols)
        # the mask as medfed places it on its image, on the padded square, padding removed
        square = decode_mask(data / row["mask"], Preprocess(image_size=side), like=meta,
                             image=data / row["path"])[0][0, 0]
        top, left = (side - meta.rows) // 2, (side - meta.cols) // 2
        masks.append(square[top : top + meta.rows, left : left + meta.cols] > 0)
        images.append(image.pixels[0])
        modalities.append(meta.modality or "?")
    return np.stack(images), masks, modalities


def hit(saliency: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's maximum on the mask's (source) grid is within 2 px of the mask."""
    rows, cols = mask.shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    big = F.interpolate(torch.from_numpy(saliency)[None, None].float(), size=(side, side),
                        mode="bilinear", align_corners=False)[0, 0, top : top + rows,
                                                               left : left + cols]
    row, col = np.unravel_index(int(big.argmax()), big.shape)
    return bool(ndimage.distance_transform_edt(~mask)[row, col] <= TOLERANCE_PX)


def levels(model: nn.Module, example: torch.Tensor) -> list[tuple[str, int]]:
    """Per spatial resolution the network computes, the last module to output it, and its side."""
    seen: dict[tuple[int, ...], tuple[int, str]] = {}
    calls = [0]

    def record(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            calls[0] += 1
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                seen[tuple(out.shape[2:])] = (calls[0], name)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(example)
    for h in handles:
        h.remove()
    ordered = sorted(seen.items(), key=lambda kv: kv[1][0])
    return [(name, shape[-1]) for shape, (_, name) in ordered]


def layer_maps(
    model: nn.Module, x: torch.Tensor, names: list[str]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Grad-CAM and LayerCAM of class 1 at each module, on the input grid, each in [0, 1]."""
    acts: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda _m, _i, o, n=n: acts.__setitem__(n, o)) for n in names]
    try:
        with torch.enable_grad():
            logits = model(x.clone().requires_grad_(True))
            grads = torch.autograd.grad(logits[:, 1].sum(), [acts[n] for n in names])
    finally:
        for h in handles:
            h.remove()
    size = tuple(x.shape[2:])

    def up(m: torch.Tensor) -> torch.Tensor:
        return normalised(F.interpolate(m[:, None], size=size, mode="bilinear",
                                        align_corners=False)[:, 0])

    grad_cams, layer_cams = [], []
    for name, g in zip(names, grads, strict=True):
        a = acts[name].detach()
        grad_cams.append(up(F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))))
        layer_cams.append(up(F.relu((F.relu(g) * a).sum(1))))
    return grad_cams, layer_cams


def methods(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every candidate's maps of class 1 for images x, in batches."""
    found = levels(model, x[:1])
    names = [name for name, _ in found]
    at = {name: f"{name} ({side}x{side})" for name, side in found}
    out: dict[str, list[np.ndarray]] = {}

    def add(key: str, maps: torch.Tensor) -> None:
        out.setdefault(key, []).append(maps.detach().cpu().numpy())

    monai = GradCAM(copy.deepcopy(model), target_layers=names[-1],
                    postprocessing=lambda m: m)  # its default flips the map (max -> 0)
    ones = torch.ones(len(x), dtype=torch.long)
    for start in range(0, len(x), 16):
        xb, tb = x[start : start + 16], ones[start : start + 16]
        add(f"Grad-CAM (MONAI) at {at[names[-1]]}", monai(xb, class_idx=1)[:, 0])
        grad_cams, layer_cams = layer_maps(model, xb, names)
        for name, m in zip(names[:-1], grad_cams[:-1], strict=True):
            add(f"Grad-CAM at {at[name]}", m)
        for name, m in zip(names, layer_cams, strict=True):
            add(f"LayerCAM at {at[name]}", m)
        g, _ = input_gradient(model, xb, tb)
        gx = F.relu((g * xb).sum(1))
        fused = torch.stack([m + FLOOR for m in [normalised(gx), *layer_cams]]).prod(0)
        add("LayerCAM fused (product), all levels + input", fused)
        add("gradient x input", gx)
        add("gradient x input, smoothed", gaussian_blur(gx, xb.shape[-1] / 32))
        add("gradient x (input - mean), unsmoothed",
            F.relu((g * (xb - xb.mean((2, 3), keepdim=True))).sum(1)))
        add("gradient x (input - mean), smoothed", evidence_map(xb, g))
    maps = {k: np.concatenate(v) for k, v in out.items()}
    maps["saliency_maps() (medfed predict)"] = saliency_maps(
        model, x.numpy(), torch.device("cpu"), target=1)
    return maps


def phantom_seeds(seeds: int) -> None:
    """Hit rates of the main candidates over classifiers trained in-process, one per seed."""
    from tests.client.test_saliency import ct_phantoms, pointing_hits, train

    train_x, _, train_y = ct_phantoms(400, seed=0)
    test_x, test_masks, test_y = ct_phantoms(400, seed=7)
    lesion = test_y == 1
    print("| lesions | method | mean | min | max |\n|---|---|---|---|---|")
    for polarity in ("bright", "dark"):
        flip = (lambda a: 1 - a) if polarity == "dark" else (lambda a: a)
        x, masks = torch.from_numpy(flip(test_x[lesion])), test_masks[lesion]
        rates: dict[str, list[float]] = {}
        for seed in range(seeds):
            model = train(flip(train_x), train_y, epochs=6, seed=seed)
            ones = torch.ones(len(x), dtype=torch.long)
            g, logits = input_gradient(model, x, ones)
            centred = F.relu((g * (x - x.mean((2, 3), keepdim=True))).sum(1))
            monai = GradCAM(copy.deepcopy(model), target_layers="features",
                            postprocessing=lambda m: m)
            candidates = {
                "called positive (ceiling)": None,
                "Grad-CAM (MONAI) at the last layer": monai(x, class_idx=1)[:, 0],
                "gradient x input": F.relu((g * x).sum(1)),
                "gradient x input, smoothed": gaussian_blur(F.relu((g * x).sum(1)), 2.0),
                "gradient x (input - mean), unsmoothed": centred,
                "saliency_maps() (medfed predict)": torch.from_numpy(
                    saliency_maps(model, x.numpy(), torch.device("cpu"))),
            }
            for name, maps in candidates.items():
                rate = (float((logits.softmax(1)[:, 1] > 0.5).float().mean()) if maps is None
                        else float(pointing_hits(maps.detach().numpy(), masks).mean()))
                rates.setdefault(name, []).append(rate)
        for name, values in rates.items():
            print(f"| {polarity} | {name} | {np.mean(values):.2f} | {min(values):.2f} | "
                  f"{max(values):.2f} |")


def main() -> None:
    """Print the pointing-game table for RUN_DIR's classifier on TEST_DIR's lesion images."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?")
    parser.add_argument("test", type=Path, nargs="?")
    parser.add_argument("--phantom-seeds", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.phantom_seeds:
        phantom_seeds(args.phantom_seeds)
        return
    if args.run is None or args.test is None:
        parser.error("give RUN_DIR and TEST_DIR, or --phantom-seeds N")
    saved = load_model_file(args.run / "model.pt")
    model = build_model(saved["model"], **saved["model_args"])
    model.load_state_dict(saved["state_dict"])
    model.eval()
    images, masks, modalities = lesion_images(args.test, saved["model_args"]["image_size"])
    x = torch.from_numpy(images)
    with torch.no_grad():
        called = (model(x).softmax(1)[:, 1] > 0.5).numpy()
    kinds = np.array(modalities)
    groups = sorted(set(modalities))
    counts = ", ".join(f"{g} {int((kinds == g).sum())}" for g in groups)
    print(f"{saved['model']} {args.run}: {len(x)} lesion images ({counts}); "
          f"called positive {called.mean():.2f}")
    print("| method | all | " + " | ".join(groups) + " | called + | called - |")
    print("|---" * (len(groups) + 4) + "|")
    for name, maps in methods(model, x).items():
        hits = np.array([hit(m, mask) for m, mask in zip(maps, masks, strict=True)])
        cells = [hits.mean(), *(hits[kinds == g].mean() for g in groups),
                 hits[called].mean() if called.any() else float("nan"),
                 hits[~called].mean() if (~called).any() else float("nan")]
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
