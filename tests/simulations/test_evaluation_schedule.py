"""One message per round: each round's model is scored at the start of the next round's training.

On Flower's simulation engine with real sites: the messages each site receives, and a run's
per-round evaluation, which must equal the one separate evaluation messages give.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app import make_client_app
from common.config import RunConfig
from common.evaluation import INCOMING_KEY, evaluation_message_after
from common.sites import site_refs
from server.run import run_federation
from tests.simulations.conftest import write_easy_hospitals

pytestmark = pytest.mark.slow

SITES = [("site-a", 40, 0.4), ("site-b", 30, 0.5), ("site-c", 30, 0.6)]


def _watch(log: Path) -> Any:
    """A mod noting each message a site receives in `log` (the sites run in Ray's workers).

    One JSON line per message: [site, type, round, incoming round].
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        config = msg.content.config_records["config"]
        kind = "train" if msg.metadata.message_type == MessageType.TRAIN else "evaluate"
        site = str(context.node_config["partition-id"])
        with log.open("a") as fh:
            fh.write(json.dumps([site, kind, int(config.get("server-round", 0)),  # type: ignore[call-overload]
                                 config.get(INCOMING_KEY)]) + "\n")
        return call_next(msg, context)

    return mod


def _run(sites: Path, out: Path, every: int) -> tuple[dict[str, Any], list[Any]]:
    cfg = RunConfig(sites_dir=str(sites), out=str(out), rounds=3, local_steps=2, dp=False,
                    image_size=32, batch_size=8, min_sites=3, run_key="schedule", seed=1,
                    evaluate_every=every)
    refs = site_refs(sites, out / "site-state")
    seen = out / "seen.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    records: list[Any] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        records.append(run_federation(grid, cfg, site_dirs=[r.data_dir for r in refs]))

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=server, client_app=make_client_app(refs, mods=[_watch(seen)]),
        num_supernodes=len(refs),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                          "logging_level": logging.ERROR, "log_to_driver": False},
        },
    )
    return records[0].to_dict(), [tuple(json.loads(line)) for line in seen.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[dict[str, Any], list]]:
    root = tmp_path_factory.mktemp("schedule")
    sites = write_easy_hospitals(root, SITES, 20, seed=4) / "sites"
    return {every: _run(sites, root / f"every-{every}", every) for every in (0, 1)}


def test_the_schedule_sends_evaluation_messages_after_the_nth_and_the_last_round() -> None:
    assert [r for r in range(1, 8) if evaluation_message_after(r, every=0, last=7)] == [7]
    assert [r for r in range(1, 8) if evaluation_message_after(r, every=1, last=7)] == list(
        range(1, 8))
    assert [r for r in range(1, 8) if evaluation_message_after(r, every=3, last=7)] == [3, 6, 7]


def test_by_default_a_round_is_one_message_and_its_model_is_scored_in_the_next(runs) -> None:
    _, seen = runs[0]
    for site in "012":
        mine = [(kind, rnd, incoming) for s, kind, rnd, incoming in seen if s == site]
        assert mine == [("train", 1, None), ("train", 2, 1), ("train", 3, 2),
                        ("evaluate", 3, None)], mine
    _, classic = runs[1]
    assert sorted(k for _, k, _, _ in classic) == ["evaluate"] * 9 + ["train"] * 9
    assert all(incoming is None for *_, incoming in classic)


def test_every_round_is_evaluated_and_scores_equal_separate_evaluation_messages(runs) -> None:
    folded, _ = runs[0]
    separate, _ = runs[1]
    for one, other in zip(folded["rounds"], separate["rounds"], strict=True):
        assert sorted(one["federated"]["sites"]) == ["site-a", "site-b", "site-c"]
        for name, site in one["federated"]["sites"].items():
            want = other["federated"]["sites"][name]["evaluate"]
            # the same model either way (the aggregate's float sums may differ in order)
            assert site["evaluate"] == pytest.approx(want, rel=1e-3), (one["round"], name)
        assert one["federated"]["evaluate"] == pytest.approx(other["federated"]["evaluate"],
                                                             rel=1e-3)
        assert one["operating_point"]["threshold"] == pytest.approx(
            other["operating_point"]["threshold"], rel=1e-3)
    assert folded["final"]["auc"] == pytest.approx(separate["final"]["auc"], rel=1e-3)
