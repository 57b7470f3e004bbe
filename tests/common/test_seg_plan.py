"""The segmentation planner: what the sites' fingerprints decide, and the U-Net's shape."""

from __future__ import annotations

import math

import pytest

from common.config import ConfigError, RunConfig
from common.fingerprint import Fingerprint
from common.seg_plan import plan_run, planned_shape, pooled_shares
from models import build_model


def _fp(max_label: int = 1, shares: tuple[float, ...] = (9.0, 1.0), n: int = 40) -> Fingerprint:
    return Fingerprint(train_images=n, val_images=n // 4, rows=512.0, cols=480.0, slices=1.0,
                       spacing_row=0.7, spacing_col=0.7, max_label=max_label,
                       class_shares=shares)


def test_the_wire_form_round_trips_and_refuses_a_malformed_reply():
    fp = _fp(2, (7.0, 2.0, 1.0))
    assert Fingerprint.from_metrics(fp.to_metrics()) == fp
    broken = fp.to_metrics()
    broken["fp-class-shares"] = [1.0]
    with pytest.raises(ValueError, match="class shares"):
        Fingerprint.from_metrics(broken)
    broken = fp.to_metrics()
    del broken["fp-rows"]
    with pytest.raises(ValueError, match="fp-rows"):
        Fingerprint.from_metrics(broken)


def test_num_classes_rises_to_cover_every_sites_labels_and_never_falls():
    cfg = RunConfig(task="segment")
    planned, plan = plan_run(cfg, {"a": _fp(1), "b": _fp(2, (5.0, 3.0, 2.0))})
    assert planned.num_classes == 3 and plan["choices"]["num-classes"] == 3
    assert "labels up to 2" in plan["reasons"]["num-classes"]
    kept, plan = plan_run(cfg.replace(num_classes=5), {"a": _fp(1)})
    assert kept.num_classes == 5 and "num-classes" not in plan["choices"]


def test_pooled_shares_weigh_sites_by_pixels_and_skip_a_refused_release():
    fps = {"a": _fp(1, (9.0, 1.0)), "b": _fp(1, (-2.0, 10.0)),
           "c": _fp(1, (math.nan, math.nan))}
    assert pooled_shares(fps) == pytest.approx([9 / 20, 11 / 20])
    assert pooled_shares({"c": fps["c"]}) is None


def test_the_plan_records_the_pooled_fingerprint_and_the_unets_shape():
    _, plan = plan_run(RunConfig(task="segment", dp=False), {"a": _fp(n=30), "b": _fp(n=70)})
    assert plan["pooled"]["smallest-site"] == 30 and plan["pooled"]["largest-site"] == 70
    assert plan["pooled"]["median-rows"] == 512.0
    assert plan["choices"]["net-width"], plan["choices"]["net-depth"] == planned_shape(64, dp=False)
    _, given = plan_run(RunConfig(task="segment", net_width=24, net_depth=3), {"a": _fp()})
    assert given["choices"]["net-width"] == 24 and given["choices"]["net-depth"] == 3
    assert given["reasons"]["net-width"] == "given"


@pytest.mark.parametrize("size", [16, 32, 64, 128, 256, 512])
@pytest.mark.parametrize("dp", [True, False])
def test_the_planned_unet_builds_and_keeps_its_deepest_level_whole(size, dp):
    width, depth = planned_shape(size, dp=dp)
    assert size % 2**depth == 0 and size // 2**depth >= 4
    assert width == 8
    cfg = RunConfig(task="segment", image_size=size, dp=dp)
    model = build_model("unet", **cfg.network_args())
    assert model.depth == depth


def test_a_given_shape_is_checked_where_it_is_set():
    with pytest.raises(ConfigError, match="--net-depth"):
        RunConfig(task="segment", image_size=48, net_depth=5)
    with pytest.raises(ConfigError, match="--net-width.*--task segment"):
        RunConfig(task="classify", net_width=16)
    with pytest.raises(ConfigError, match="--net-width"):
        RunConfig(task="segment", net_width=2)


def test_a_segmentation_batch_holds_about_the_same_pixels_at_any_image_size():
    from common.seg_plan import planned_batch

    assert RunConfig(task="segment").batch_size == planned_batch(64) == 16
    assert RunConfig(task="segment", image_size=256).batch_size == 4  # never below 4
    assert RunConfig(task="segment", image_size=256, batch_size=32).batch_size == 32  # given
    assert RunConfig().batch_size == 64  # classification keeps its batch
    cfg = RunConfig(task="segment", image_size=128)
    assert RunConfig.from_mapping(cfg.to_mapping()).batch_size == 4  # resolved once, carried


def test_the_output_layer_starts_at_the_pooled_class_shares():
    import numpy as np
    import torch

    from server.fingerprint import with_class_prior

    cfg = RunConfig(task="segment", dp=False)
    _, plan = plan_run(cfg, {"a": _fp(1, (98.0, 2.0)), "b": _fp(1, (49.0, 1.0))})
    prior = plan["choices"]["class-prior"]
    assert prior == pytest.approx([0.98, 0.02])
    _, rare = plan_run(cfg, {"a": _fp(1, (999.0, 1.0))})  # 0.1%: starts at the 1% floor
    assert rare["choices"]["class-prior"] == pytest.approx([0.99, 0.01], rel=0.01)
    model = build_model("unet", **cfg.network_args())
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    started = with_class_prior(arrays, prior)
    assert torch.softmax(torch.as_tensor(started["head.bias"]), 0).tolist() == pytest.approx(
        [0.98, 0.02])
    assert all(np.array_equal(arrays[k], started[k]) for k in arrays if k != "head.bias")
    # a share lost in a DP release's noise still starts small, never at zero
    _, noisy = plan_run(cfg.replace(dp=True), {"a": _fp(1, (30.0, -2.0))})
    assert noisy["choices"]["class-prior"][1] == pytest.approx(0.01, rel=0.02)
    assert with_class_prior(arrays, [0.5, 0.3, 0.2]) is arrays  # another class count: untouched
