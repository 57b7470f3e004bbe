"""The sites of a simulated federation as Flower's simulation engine gets them.

`simulated_sites` turns a `Federation` into what `make_client_app` takes: the sites indexed by
Flower's partition-id (site folders, or lazy virtual sites cut out of one pool), the loader that
reads a site's samples (scanner shift and label flipping applied), and the client mods (torch
threads, fault injection). All of it is small and picklable: Flower ships the ClientApp to a Ray
worker with every message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.site import load_labelled
from common.config import ConfigError, RunConfig
from common.data import Preprocess
from common.sites import SiteRef, site_refs
from common.training.tasks import SplitLoader
from simulations.faults import FAULTS_FILE, FaultPlan, OutageMod, TamperMod, flip_labels
from simulations.partition import PartitionSpec, VirtualSites
from simulations.scenario import Federation
from simulations.shift import ScannerShift


@dataclass(frozen=True)
class SimulatedData:
    """A simulated site's samples: its folder or pool share, its scanner, its (flipped) labels."""

    virtual: VirtualSites | None
    shift: ScannerShift
    label_flip: frozenset[str]
    num_classes: int

    def __call__(
        self, site: SiteRef, pre: Preprocess, seed: int, split: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The labelled samples of `split` that `site` trains or validates on."""
        read = self.virtual.labelled if self.virtual is not None else load_labelled
        images, labels = read(site, pre, seed, split)
        images = self.shift.apply(images, site=site.name, seed=seed, split=split)
        if split == "train" and site.name in self.label_flip:
            labels = flip_labels(labels, self.num_classes)
        return images, labels


@dataclass(frozen=True)
class ThreadsMod:
    """Torch's thread count in a worker = the CPUs Ray gives each site (at least one)."""

    cpus: float

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Set torch's threads once per worker process, then run the handler."""
        import torch

        threads = max(1, int(self.cpus))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return call_next(msg, context)


# RUN_DIR's folder of the virtual sites' own state (privacy, audit trail, progress, site.log)
SITE_STATE = "site-state"


@dataclass(frozen=True)
class SimulatedSites:
    """What the simulation engine is handed."""

    refs: Sequence[SiteRef]
    data: SplitLoader
    mods: list[Mod]  # around the handlers (make_client_app's `mods`)
    outer_mods: list[Mod]  # around the whole site (`outer_mods`)
    # one entry per site (the strategy counts them); virtual sites all name their pool
    data_dirs: list[Path]
    plan: FaultPlan

    @property
    def names(self) -> list[str]:
        """Every site's name, in partition-id order."""
        return [r.name for r in self.refs]


def simulated_sites(cfg: RunConfig, federation: Federation, run_dir: Path) -> SimulatedSites:
    """Build the federation's sites for the run `cfg` writing to `run_dir`."""
    state_root = run_dir / SITE_STATE
    source = Path(cfg.sites_dir).resolve()
    refs: Sequence[SiteRef]
    virtual: VirtualSites | None = None
    if federation.data.pooled and cfg.task != "classify":
        raise ConfigError(
            f"--task {cfg.task} reads site folders (masks, unlabelled images): drop the "
            "scenario's data.partition and point --data at a folder of site folders"
        )
    if federation.data.pooled:
        if not (source / "labels.csv").is_file():
            raise ConfigError(
                f"data.path {source}: no labels.csv there; with data.partition it must be ONE "
                "folder in the site layout (e.g. data/synth/sites/hospital-01), without "
                "data.partition a folder of site folders"
            )
        assert federation.sites is not None  # internal: the parser requires it with a partition
        virtual = VirtualSites(
            source, state_root,
            PartitionSpec(federation.sites, federation.data.partition, federation.data.alpha,
                          cfg.seed),
        )
        refs, data_dirs = virtual, [source] * len(virtual)
    else:
        refs = site_refs(source, state_root)
        if federation.sites is not None and federation.sites != len(refs):
            raise ConfigError(
                f"sites = {federation.sites} but data.path {source} holds {len(refs)} site "
                "folders; drop `sites`, or set data.partition to cut one folder into sites"
            )
        data_dirs = [r.data_dir for r in refs]
    names = virtual.names() if virtual is not None else [r.name for r in refs]
    plan = federation.faults.plan(names, seed=cfg.seed, round_timeout=cfg.round_timeout)
    mods: list[Mod] = [ThreadsMod(federation.resources.cpus)]
    outer: list[Mod] = []
    if federation.faults.any:
        outer.append(OutageMod(plan, refs, run_dir / FAULTS_FILE))
        mods.append(TamperMod(plan, refs, run_dir / FAULTS_FILE))
    data = SimulatedData(
        virtual=virtual, shift=federation.data.scanner_shift,
        label_flip=frozenset(s for s, k in plan.misbehaving.items() if k == "label_flip"),
        num_classes=cfg.num_classes,
    )
    return SimulatedSites(
        refs=refs, data=data, mods=mods, outer_mods=outer, data_dirs=data_dirs, plan=plan
    )
