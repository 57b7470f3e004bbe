"""SecAgg+ end to end on Flower's simulation engine: what the aggregator holds, and dropouts."""

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from opacus.accountants import RDPAccountant

from client.app import make_client_app
from client.audit_state import verify_state
from common.config import RunConfig
from common.sites import site_refs
from server.run import run_federation
from simulations.runner import simulate
from simulations.synth import synthesize
from tests.simulations.conftest import write_easy_hospitals

pytestmark = pytest.mark.slow

SITES = [("site-a", 60, 0.3), ("site-b", 45, 0.5), ("site-c", 30, 0.6), ("site-d", 45, 0.5)]


class _SpyGrid:
    """The Grid the workflow talks to, keeping every reply that reached the aggregator."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.replies: list[Message] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _capture_mod(folder: Path, drop: str) -> Any:
    """Inside SecAgg+: save each site's unmasked update, and make site `drop` fail round 1.

    Sits where a simulation's fault mods sit, so it sees the update before masking.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        site = str(reply.content.config_records["site"]["name"])
        if site == drop:
            raise RuntimeError("the site's network went down after sharing its keys")
        arrays = {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()}
        weight = int(reply.content.metric_records["metrics"]["num-examples"])  # type: ignore[call-overload]
        np.savez(folder / f"{site}.npz", __weight__=np.array(weight), **arrays)
        return reply

    return mod


def _run(cfg: RunConfig, sites: Path, mods: list[Any]) -> _SpyGrid:
    refs = site_refs(sites, Path(cfg.out) / "site-state")
    spies: list[_SpyGrid] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        spy = _SpyGrid(grid)
        spies.append(spy)
        run_federation(spy, cfg, site_dirs=[r.data_dir for r in refs])  # type: ignore[arg-type]

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=server, client_app=make_client_app(refs, mods=mods),
        num_supernodes=len(refs),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                          "logging_level": logging.ERROR, "log_to_driver": False},
        },
    )
    return spies[0]


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory) -> Path:
    return write_easy_hospitals(tmp_path_factory.mktemp("secagg"), SITES, 40, seed=3) / "sites"


def test_aggregator_holds_only_the_masked_sum_and_a_dropout_is_recovered(
    four_sites: Path, tmp_path: Path
) -> None:
    captured = tmp_path / "updates"
    captured.mkdir()
    cfg = RunConfig(
        sites_dir=str(four_sites), out=str(tmp_path / "run"), rounds=1, local_steps=2, dp=False,
        image_size=32, batch_size=16, lr=1e-3, secure_agg=True, secagg_shares=1.0,
        secagg_threshold=0.6, min_sites=3, fraction_evaluate=0.0, run_key="secagg-test",
    )
    spy = _run(cfg, four_sites, [_capture_mod(captured, drop="site-d")])

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    entry = results["rounds"][0]
    assert entry["participants"] == ["site-a", "site-b", "site-c"]
    assert {f["kind"] for f in entry["failures"]} == {"error"}  # site-d's contained failure
    # each site's signed audit head reaches results.json in its legacy metrics (the masked
    # vector's reply: its 3rd entry), and the site's trail verifies against it
    assert sorted(entry["audit_heads"]) == entry["participants"]
    for site in entry["participants"]:
        assert entry["audit_heads"][site]["seq"] == 2
        verify_state(tmp_path / "run" / "site-state" / site,
                     witness=tmp_path / "run" / "results.json")

    # the global model equals the plain num-examples-weighted mean of the surviving updates
    updates = {p.stem: dict(np.load(p)) for p in captured.glob("*.npz")}
    assert sorted(updates) == ["site-a", "site-b", "site-c"]
    weights = np.array([float(u.pop("__weight__")) for u in updates.values()])
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    # SecAgg+ quantises weight/max-weight * value to 2**22 levels over [-8, 8] with stochastic
    # rounding: each site's share is off by less than a level, and the sum is divided by the
    # total weight
    bound = len(weights) * (16 / 2**22) / (weights.sum() / cfg.secagg_max_weight)
    for name, value in final.items():
        stacked = np.stack([u[name] for u in updates.values()]).astype(np.float64)
        expected = np.tensordot(weights / weights.sum(), stacked, axes=1)
        np.testing.assert_allclose(value.numpy(), expected, atol=1.05 * bound + 1e-6, rtol=0)

    # nothing the aggregator received holds a site's update: no arrays at all, and no byte
    # string equal to (or containing) a site's serialised weights
    assert spy.replies, "the spy saw no replies"
    site_bytes = [v.astype(np.float32).tobytes() for u in updates.values() for v in u.values()
                  if v.size >= 16]
    for reply in spy.replies:
        if reply.has_error():
            continue
        for record in reply.content.array_records.values():
            assert len(record) == 0, "an ArrayRecord with data reached the aggregator"
        for record in reply.content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes):
                        assert not any(chunk[:64] in item for chunk in site_bytes)
    kinds = {str(r.content.config_records.get("fitres.metrics", {}).get("site-name", ""))
             for r in spy.replies if not r.has_error()}
    assert {"site-a", "site-b", "site-c"} <= kinds

    # each site's audit trail holds what left: protocol messages, never a plain update
    trail = (tmp_path / "run" / "site-state" / "site-a" / "audit.jsonl").read_text().splitlines()
    types = [json.loads(line)["message_type"] for line in trail]
    assert types == [
        "train/secagg-setup", "train/secagg-share_keys", "train/secagg-collect_masked_vectors",
        "train/secagg-unmask",
    ]
    assert all(json.loads(line)["arrays"] == [] for line in trail)


def test_secure_aggregation_with_central_dp_accounts_each_release(
    four_sites: Path, tmp_path: Path
) -> None:
    cfg = RunConfig(
        sites_dir=str(four_sites), out=str(tmp_path / "run"), rounds=2, local_steps=2, dp=False,
        image_size=32, batch_size=16, secure_agg=True, central_dp="client-fixed",
        central_noise=0.8, clip_norm=0.5, min_sites=4, run_key="secagg-dp-test",
    )
    _run(cfg, four_sites, [])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    central = results["central_privacy"]
    assert central["releases"] == 2 and central["sites_per_round"] == 4
    acc = RDPAccountant()
    acc.history = [(0.8, 1.0, 2)]
    assert central["epsilon"] == pytest.approx(acc.get_epsilon(delta=cfg.delta))
    assert [len(r["participants"]) for r in results["rounds"]] == [4, 4]
    # every site weighs the same under central DP and reports the unit weight
    for entry in results["rounds"]:
        for metrics in entry["federated"]["sites"].values():
            assert metrics["train"]["unit-weight"] == 1


def _fail_training_mod(partitions: set[int]) -> Any:
    """Make the sites of these partition ids fail to train (so they send no masked vector)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if (msg.metadata.message_type == MessageType.TRAIN
                and int(context.node_config["partition-id"]) in partitions):
            raise RuntimeError("the site's network went down after sharing its keys")
        return call_next(msg, context)

    return mod


def test_a_round_secagg_cannot_unmask_is_a_failed_round_for_every_site(
    four_sites: Path, tmp_path: Path
) -> None:
    # two of four sites leave after sharing their keys: with 3 shares per site (itself and two
    # neighbours) some site is left with fewer than the 2 live shares its masks need, so
    # SecAgg+ stops before unmasking and no update may be used, not even the two masked ones
    cfg = RunConfig(
        sites_dir=str(four_sites), out=str(tmp_path / "run"), rounds=1, local_steps=2, dp=False,
        image_size=32, batch_size=16, secure_agg=True, secagg_shares=3, secagg_threshold=2,
        min_sites=4, fraction_evaluate=0.0, run_key="secagg-halt-test",
    )
    _run(cfg, four_sites, [_fail_training_mod({2, 3})])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    entry = results["rounds"][0]
    assert entry["participants"] == []
    failures = entry["failures"]
    left = {f["site"] for f in failures if "went down" in f["reason"]}
    assert left == {"site-c", "site-d"}
    stopped = {f["site"]: f["kind"] for f in failures if "SecAgg+ stopped" in f["reason"]}
    assert stopped == {"site-a": "error", "site-b": "error"}
    assert [f["stage"] for f in failures if f["site"] == "*"] == ["aggregate"]
    assert results["outcome"]["status"] == "failed" and not results["outcome"]["trained"]
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.fixture(scope="module")
def segment_sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("secagg-segment")
    synthesize(root, sites=2, images_per_site=24, seed=3, test_images=24)
    return root


def _files(run_dir: Path, run_key: str) -> set[str]:
    # each site's privacy ledger is named after the run's key, which differs between runs
    return {str(p.relative_to(run_dir)).replace(run_key, "RUN")
            for p in run_dir.rglob("*") if p.is_file()}


def _layout(results: dict[str, Any]) -> dict[str, Any]:
    """What a reader of results.json relies on: its sections, each round's, and whom they name."""
    last = results["rounds"][-1]
    return {
        "sections": sorted(results),
        "round": sorted(last),
        "final": sorted(results["final"]),
        "sites": {key: sorted(last[key]) for key in ("update_bytes", "audit_heads", "privacy")}
        | {"federated": sorted(last["federated"]["sites"]),
           "cross_site": sorted(results["cross_site"]["sites"])},
    }


def test_secure_aggregation_writes_what_a_plain_run_writes(segment_sites: Path,
                                                           tmp_path: Path) -> None:
    # one federation loop: the task's hooks (segmentation.png), checkpoints, the record and
    # each round's per-site entries are the same with or without SecAgg+
    runs = {}
    for secure in (False, True):
        cfg = RunConfig(
            sites_dir=str(segment_sites / "sites"), test_data=str(segment_sites / "test"),
            out=str(tmp_path / f"secure-{secure}"), rounds=1, local_steps=2, image_size=16,
            batch_size=8, task="segment", secure_agg=secure,
        )
        runs[secure] = (Path(cfg.out), simulate(cfg))
    (plain_dir, plain), (secure_dir, secure) = runs[False], runs[True]
    assert (secure_dir / "segmentation.png").stat().st_size > 1000
    assert _files(secure_dir, secure["config"]["run-key"]) == _files(
        plain_dir, plain["config"]["run-key"])
    assert _layout(secure) == _layout(plain)
    assert secure["rounds"][0]["participants"] == ["hospital-01", "hospital-02"]
    assert _layout(secure)["sites"]["update_bytes"] == ["hospital-01", "hospital-02"]
