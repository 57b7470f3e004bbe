"""SCAFFOLD end to end: Flower simulation, DP at every site, checkpoint and resume."""

from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig
from common.privacy import epsilon_of
from common.scaffold import CONTROL_PREFIX
from common.training.scaffold import control_path, load_control
from server.run import RoundUpdate
from simulations.runner import resume_config, simulate

pytestmark = pytest.mark.slow


def test_scaffold_federation_keeps_control_variates_and_accounts_only_dp_sgd(
    easy_hospitals: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cfg = RunConfig(
        sites_dir=str(easy_hospitals / "sites"), test_data=str(easy_hospitals / "test"),
        out=str(run_dir), rounds=2, local_steps=3, batch_size=16, image_size=32,
        strategy="scaffold", seed=0,
    )

    def stop_after_round_one(update: RoundUpdate) -> None:
        if update.round == 1:
            raise RuntimeError("the aggregator machine went down")

    with pytest.raises(RuntimeError):
        simulate(cfg, on_round=stop_after_round_one)
    first = dict(np.load(run_dir / "checkpoint" / "strategy.npz"))
    assert first and all(k.startswith("control/") for k in first)
    assert any(np.abs(v).sum() > 0 for v in first.values())  # c moved after one round

    results = simulate(resume_config(run_dir, {}), resume=True)
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert all(r["failures"] == [] for r in results["rounds"])
    with np.load(run_dir / "checkpoint" / "arrays.npz") as arrays:
        assert not [k for k in arrays.files if k.startswith(CONTROL_PREFIX)]  # model only
    run_key = results["config"]["run-key"]
    for site in ("site-a", "site-b", "site-c"):
        c_i = load_control(control_path(run_dir / "site-state" / site, run_key))
        assert c_i and all(np.isfinite(v).all() for v in c_i.values())
        # the control variates cost nothing: epsilon is DP-SGD's alone, Opacus's accountant
        p = results["privacy"][site]
        assert p["steps"] == 2 * 3
        assert p["epsilon"] == pytest.approx(epsilon_of(
            [(p["noise_multiplier"], p["sample_rate"], p["steps"])], delta=p["delta"],
            accountant=p["accountant"]), rel=1e-9)
