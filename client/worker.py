"""A site's warm worker: the ClientApp's work in one long-lived process.

    python -m client.worker --state STATE [--owner-pid PID]

`medfed site` starts it beside the SuperNode (client.worker_link.WorkerSupervisor) and starts it
again if it dies. It holds torch, the networks, the decoded images (common.training.tasks.base's
caches) and, on a GPU, the CUDA context across rounds and runs, where Flower would start a fresh
ClientApp process for every message.

Each message arrives from the ClientApp shim (client.shim) on the site's Unix socket and runs
through the same ClientApp that a simulation runs (client.app.make_client_app): the run policy,
the privacy ledger, the outbound guard and the audit trail apply to it exactly as they did when
the ClientApp ran in Flower's process. The reply goes back to the shim, which hands it to Flower.

It answers its own user only (socket mode 0600 in a 0700 folder, and the peer's uid checked), one
request at a time, and exits when its owner (`medfed site`) is gone or when asked to stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client import worker_link as link
from common import logs
from common.procs import alive

log = logging.getLogger("medfed.site")


class Worker:
    """The socket server around one ClientApp."""

    def __init__(self, state_dir: Path, code: str) -> None:
        from client.app import make_client_app  # torch, Opacus, the networks: once

        self.state_dir = state_dir
        self.code = code
        self.app = make_client_app()
        self.served = 0
        self._stop = threading.Event()

    def warm_up(self, data_dir: Path | None) -> None:
        """Do once, before the first run, what a first round would do first.

        Decode the site's images with the default preprocessing, build the default classifier
        and take one DP-SGD step on a few of them (nothing is kept or accounted: a scratch copy
        of the network and privacy state). A failure is only logged; the first round does it.
        """
        started = time.perf_counter()
        try:
            _warm_up(self.state_dir, data_dir)
        except Exception as exc:  # noqa: BLE001 - a warm-up never stops the worker
            log.warning("site worker: warm-up skipped (%s: %s)", type(exc).__name__, exc)
            return
        log.info("site worker warmed up in %.1f s", time.perf_counter() - started)

    def bind(self) -> socket.socket:
        """The listening socket (worker_link.listen), checked for a stop every 0.5 s."""
        server = link.listen(link.socket_path(self.state_dir))
        server.settimeout(0.5)
        return server

    def serve(self, owner_pid: int | None = None) -> None:
        """Answer requests until asked to stop, signalled, or the owner process is gone."""
        server = self.bind()
        log.info("site worker ready (pid %d, app %s)", os.getpid(), self.code[:12])
        try:
            while not self._stop.is_set():
                if owner_pid is not None and not alive(owner_pid):
                    log.info("site worker: medfed site (pid %d) is gone; stopping", owner_pid)
                    break
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    self.answer(conn)
        finally:
            server.close()
            link.socket_path(self.state_dir).unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop after the request being answered."""
        self._stop.set()

    def answer(self, conn: socket.socket) -> None:
        """One request on `conn`; another user's connection is closed unanswered."""
        conn.settimeout(None)
        uid = link.peer_uid(conn)
        if uid != os.getuid():
            log.warning("site worker: refused a connection from user id %d", uid)
            return
        try:
            header, payloads = link.receive_frames(conn)
        except (link.WorkerGone, ValueError) as exc:
            log.warning("site worker: unreadable request (%s)", exc)
            return
        op = header.get("op")
        if op == "hello":
            link.send_frames(conn, {"code": self.code, "pid": os.getpid(),
                                    "served": self.served})
        elif op == "stop":
            link.send_frames(conn, {"stopping": True})
            self.stop()
        elif op == "run" and len(payloads) == 2:
            answer, out = self.run(header, payloads)
            link.send_frames(conn, answer, out)
        else:
            link.send_frames(conn, {"status": "refused", "text": f"unknown request {op!r}"})

    def run(self, header: dict[str, Any], payloads: list[bytes]) -> tuple[dict[str, Any],
                                                                          list[bytes]]:
        """Run one message through the ClientApp; the reply, or the exception it raised."""
        from common.flower_compat import wire
        from common.flower_compat.task_identity import identity

        message = wire.message_from(payloads[0])
        context = wire.context_from(payloads[1])
        task = header.get("task", {})
        self.served += 1
        try:
            with identity(task_id=int(task.get("task_id", 0)), run_id=context.run_id,
                          node_id=context.node_id):
                reply = self.app(message=message, context=context)
        except Exception as exc:  # the shim raises it again, as Flower's process would have
            kind = type(exc)
            return {"status": "raised", "module": kind.__module__, "name": kind.__qualname__,
                    "text": str(exc)}, []
        return {"status": "ok"}, [wire.message_bytes(reply), wire.context_bytes(context)]


def _warm_up(state_dir: Path, data_dir: Path | None) -> None:

    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    from common.config import RunConfig
    from common.privacy import PrivacyState
    from common.sites import SiteRef
    from common.training.loop import LocalTraining, fit_dp, resolve_device
    from common.training.tasks import get_task
    from common.training.tasks.base import preprocess, site_data

    cfg = RunConfig()
    task = get_task(cfg.task)
    images = np.zeros((8, cfg.channels, cfg.image_size, cfg.image_size), dtype=np.float32)
    if data_dir is not None:
        site = SiteRef(data_dir.name, data_dir, state_dir)
        decoded = site_data(site, preprocess(cfg), cfg.seed).split("train").images
        if len(decoded):
            images = decoded[:8]
    model = task.build(cfg)
    labels = torch.arange(len(images)) % cfg.num_classes
    privacy = PrivacyState(noise_multiplier=1.0, sample_rate=0.5, planned_steps=1,
                           target_epsilon=cfg.target_epsilon, delta=1e-5,
                           accountant=cfg.accountant, max_grad_norm=1.0)
    def loss(net: torch.nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(net(batch[0]), batch[1])

    fit_dp(model, TensorDataset(torch.as_tensor(images), labels), loss,
           settings=LocalTraining(epochs=0, steps=1, batch_size=4, optimizer=cfg.optimizer,
                                  lr=cfg.lr, momentum=cfg.momentum, proximal_mu=0.0),
           device=resolve_device(cfg.device), privacy=privacy)


def main(argv: list[str] | None = None) -> int:
    """`python -m client.worker --state STATE [--owner-pid PID]`."""
    parser = argparse.ArgumentParser(prog="python -m client.worker")
    parser.add_argument("--state", type=Path, required=True, help="the site's state folder")
    parser.add_argument("--owner-pid", type=int, default=None,
                        help="stop when this process (medfed site) is gone")
    parser.add_argument("--data", type=Path, default=None,
                        help="the site's image folder, decoded once before the first run")
    args = parser.parse_args(argv)
    logs.configure()
    started = time.perf_counter()
    code = link.code_identity(link.app_folder())
    worker = Worker(args.state.resolve(), code)
    logs.configure()  # again: importing Opacus gave the root logger a handler of its own

    def on_signal(signum: int, frame: Any) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("site worker loaded the app in %.1f s", time.perf_counter() - started)
    worker.warm_up(args.data)
    worker.serve(owner_pid=args.owner_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
