"""Which site a node is: from the simulation's site list or the node's own config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context

from common.config import RunConfig
from common.sites import SiteRef, discover_sites


def resolve_site(context: Context, cfg: RunConfig, sites: Sequence[SiteRef] | None) -> SiteRef:
    """Which site this node is, from the simulation's site list or the node's own config."""
    node = context.node_config
    if "data-path" in node:
        data_dir = Path(str(node["data-path"]))
        name = str(node.get("site-name", data_dir.name))
        state_dir = Path(str(node.get("state-dir", Path.home() / ".medfed" / "sites" / name)))
        return SiteRef(name, data_dir, state_dir)
    if "partition-id" not in node:
        raise ValueError(
            "this node has no data: start the SuperNode with "
            '--node-config "data-path=/path/to/site"'
        )
    index = int(node["partition-id"])
    if sites is None:
        if not cfg.sites_dir:
            raise ValueError("set sites-dir in the run config to the folder of site folders")
        found = discover_sites(Path(cfg.sites_dir))
        state_root = Path(cfg.out) / "site-state"
        sites = [SiteRef(p.name, p, state_root / p.name) for p in found]
    if index >= len(sites):
        raise ValueError(f"partition-id {index} but only {len(sites)} site folders were found")
    return sites[index]
