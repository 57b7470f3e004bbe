"""Per-network figures on real data: BreastMNIST test AUC after a fixed short training, DP cost.

    .venv/bin/python -m bench.networks                        # every network at 28 and 64 px
    .venv/bin/python -m bench.networks --nets cnn resnet18 --sizes 28 --steps 60
    BENCH_THREADS=2 ...                                        # torch threads (default 2)

For each network (--model cnn, resnet18, resnet34, densenet121) and image size:
    auc, accuracy      central (pooled, not federated) training on BreastMNIST's training split
                       (546 ultrasound images, MedMNIST v2, CC BY 4.0), `--steps` Adam steps of
                       batch 32 at lr 1e-3 from seed 0, then the test split (156 images): AUC of
                       the malignant-class score, accuracy at the arg-max; 64 px is the 28 px
                       image up-sampled (bilinear): MedMNIST's own 64 px release is not here
    plain_step_s       median seconds of one training step (forward, backward, Adam), batch 32
    dp_step_s          the same step through Opacus (per-sample gradients with medfed's
                       convolution sampler, clipping, noise), and dp_ratio = dp / plain

The data is read from ../shared/data/breastmnist/breastmnist.npz or --data (keys train_images,
train_labels, test_images, test_labels); without it the script says so and exits 0 having
measured nothing. Each measured cell is merged into bench/networks.json as soon as it is done
(a long run can be split by --nets/--sizes), and the "## Networks" section of BENCHMARKS.md is
rewritten from that file. It is a comparison of networks under one short recipe, not a tuned
result; MedMNIST v2's ResNet-18 (28 px, 100 epochs) is shown beside it as the anchor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.training import grad_sample  # noqa: F401  (medfed's convolution sampler, as sites use it)
from models import build_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "breastmnist" / "breastmnist.npz"
RESULTS = ROOT / "bench" / "networks.json"
REPORT = ROOT / "BENCHMARKS.md"
SECTION = "## Networks"
NETS = ("cnn", "resnet18", "resnet34", "densenet121")
SIZES = (28, 64)
BATCH = 32
LR = 1e-3
# MedMNIST v2 (Yang et al., Scientific Data 2023), Table: BreastMNIST, ResNet-18 (28)
ANCHOR = {"auc": 0.901, "accuracy": 0.863}


def load_split(npz: Any, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, size, size) in [0, 1] and labels (N,) of one split."""
    images = torch.as_tensor(npz[f"{split}_images"], dtype=torch.float32).unsqueeze(1) / 255
    if size != images.shape[-1]:
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear")
    labels = torch.as_tensor(npz[f"{split}_labels"].reshape(-1), dtype=torch.long)
    return images, labels


def image_size(net: str, size: int) -> int:
    """The size `net` is measured at for `size`: the cnn takes multiples of 8 only (28 -> 32)."""
    return -(-size // 8) * 8 if net == "cnn" else size


def train_and_test(
    net: str, size: int, data: dict[str, tuple[torch.Tensor, torch.Tensor]], steps: int
) -> dict[str, float]:
    """Test AUC and accuracy after `steps` Adam steps of batch 32 on the training split."""
    torch.manual_seed(0)
    model = build_model(net, in_channels=1, num_classes=2, image_size=size)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(*data["train"]), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(0), drop_last=True)
    started, done = time.perf_counter(), 0
    model.train()
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    train_s = time.perf_counter() - started
    model.eval()
    images, labels = data["test"]
    with torch.no_grad():
        probs = torch.cat([model(b).softmax(1) for b in images.split(64)]).numpy()
    return {
        "auc": float(roc_auc_score(labels.numpy(), probs[:, 1])),
        "accuracy": float((probs.argmax(1) == labels.numpy()).mean()),
        "train_s": train_s,
    }


def _median_step(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up: allocations, Opacus's first hooks
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def step_times(net: str, size: int, repeats: int) -> dict[str, float]:
    """Median seconds of a plain and of a DP-SGD training step, batch 32, same data."""
    torch.manual_seed(0)
    x, y = torch.rand(BATCH, 1, size, size), torch.randint(0, 2, (BATCH,))

    model = build_model(net, in_channels=1, num_classes=2, image_size=size)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def plain() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    plain_s = _median_step(plain, repeats)

    dp_model = build_model(net, in_channels=1, num_classes=2, image_size=size)
    private, dp_opt, _ = PrivacyEngine().make_private(
        module=dp_model, optimizer=torch.optim.Adam(dp_model.parameters(), lr=LR),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH), noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False,
    )

    def private_step() -> None:
        dp_opt.zero_grad()
        nn.functional.cross_entropy(private(x), y).backward()
        dp_opt.step()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        dp_s = _median_step(private_step, repeats)
    return {"plain_step_s": plain_s, "dp_step_s": dp_s, "dp_ratio": dp_s / plain_s}


def _fmt(cell: dict[str, Any] | None, key: str, digits: int = 3) -> str:
    return "not run" if cell is None or key not in cell else f"{cell[key]:.{digits}f}"


def render_section(saved: dict[str, Any]) -> str:
    """The "## Networks" section of BENCHMARKS.md from bench/networks.json's content."""
    cells = saved.get("cells", {})
    settings = saved.get("settings", {})
    rows = [
        "| network | px | train steps | test AUC | test ACC | train s | plain step s | DP step s "
        "| DP / plain |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for net in NETS:
        for size in SIZES:
            c = cells.get(f"{net}@{size}")
            px, steps = (c or {}).get("px", size), (c or {}).get("steps", "not run")
            rows.append(
                f"| {net} | {px} | {steps} | {_fmt(c, 'auc')} | {_fmt(c, 'accuracy')} | "
                f"{_fmt(c, 'train_s', 0)} | {_fmt(c, 'plain_step_s', 2)} | "
                f"{_fmt(c, 'dp_step_s', 2)} | {_fmt(c, 'dp_ratio', 2)} |"
            )
    rows.append(
        f"| MedMNIST v2 ResNet-18 (anchor) | 28 | 100 epochs | {ANCHOR['auc']:.3f} | "
        f"{ANCHOR['accuracy']:.3f} | | | | |"
    )
    return "\n".join([
        SECTION,
        "",
        "Written by `python -m bench.networks` (see its docstring). BreastMNIST (MedMNIST v2, "
        "CC BY 4.0, `../shared/data`), trained centrally (pooled, not federated) for the "
        f"steps shown (Adam, batch {BATCH}, lr {LR:g}, seed 0; 17 steps are one epoch) "
        "(a short, equal budget: a comparison of networks, not a tuned result), then tested on "
        "the 156 test images; larger sizes are the 28 px image up-sampled (the cnn takes "
        "multiples of 8: 32 px for 28). Step times are medians of a few steps (after one "
        f"warm-up) at batch {BATCH} with {settings.get('threads', '?')} torch thread(s) on "
        f"{settings.get('machine', '?')}; DP steps go through Opacus with medfed's convolution "
        "sampler. On a machine shared with other work, step times vary from run to run: "
        "the ratio of two steps timed one after the other is the steadier figure. Raw "
        "figures (repeats, threads, dates): `bench/networks.json`.",
        "",
        *rows,
        "",
    ])


def write_report(saved: dict[str, Any]) -> None:
    """Replace (or add) the "## Networks" section of BENCHMARKS.md; the rest stays."""
    text = REPORT.read_text() if REPORT.is_file() else "# Benchmarks\n"
    section = render_section(saved)
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if end < 0 else text[end + 1:])
    REPORT.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Measure the requested cells, merge them into bench/networks.json, rewrite the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), choices=SIZES)
    parser.add_argument("--steps", type=int, default=60, help="training steps per network")
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DATA, help="breastmnist.npz")
    parser.add_argument("--no-train", action="store_true", help="step times only")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"bench.networks: skipped: {args.data} is absent (the shared development data; "
              "pass --data PATH/breastmnist.npz)")
        return 0
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    saved: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    saved["settings"] = {
        "steps": args.steps, "timing_repeats": args.timing_repeats, "threads": threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }
    cells = saved.setdefault("cells", {})
    with np.load(args.data) as npz:
        for size in args.sizes:
            for net in args.nets:
                px = image_size(net, size)
                data = {s: load_split(npz, s, px) for s in ("train", "test")}
                cell: dict[str, Any] = dict(cells.get(f"{net}@{size}", {}), px=px)
                if not args.no_train:
                    cell.update(train_and_test(net, px, data, args.steps), steps=args.steps)
                cell.update(step_times(net, px, args.timing_repeats),
                            timing_repeats=args.timing_repeats, threads=threads)
                cell["measured"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                cells[f"{net}@{size}"] = cell
                print(f"{net} @ {size} px: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in cell.items() if isinstance(v, float)
                ), flush=True)
                RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
                write_report(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
