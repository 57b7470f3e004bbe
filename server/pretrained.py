"""--pretrained FILE: a state dict the user brings, loaded into the run's network before round 1.

The file is read by `common.modelfile.load_torch_file` (torch's restricted unpickler: a crafted
file cannot run code); nothing is ever downloaded. Accepted layouts: a bare state dict, medfed's
own model.pt (its `state_dict`), and a training checkpoint that holds one under `state_dict` or
`model_state_dict`, keys prefixed with `module.` (DataParallel, DistributedDataParallel) or
`_module.` (Opacus) or not.

A layer of the file whose name and shape match the network's is copied; a layer whose shape
differs (a head with other classes, a 3-channel stem for a 1-channel run, a 7x7 ImageNet stem for
a small image) keeps its initial weights, and those are named in one log line. A file with no
matching layer at all is refused: it was trained for another network.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.config import ConfigError
from common.modelfile import load_torch_file

log = logging.getLogger("medfed.server")

StateDict = dict[str, torch.Tensor]
_WRAPPERS = ("state_dict", "model_state_dict")
_PREFIXES = ("module.", "_module.")


def _is_state_dict(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _strip(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def read_state_dict(path: Path) -> StateDict:
    """The state dict in `path`, keys without `module.` prefixes; ConfigError with the fix."""
    if not path.is_file():
        raise ConfigError(
            f"--pretrained {path}: no such file; pass the .pt file of the weights "
            "(a state dict saved with torch.save(model.state_dict(), FILE), or a medfed model.pt)"
        )
    saved: Any = load_torch_file(path, what="--pretrained file")
    if isinstance(saved, Mapping) and not _is_state_dict(saved):
        saved = next((saved[k] for k in _WRAPPERS if _is_state_dict(saved.get(k))), saved)
    if not _is_state_dict(saved):
        raise ConfigError(
            f"--pretrained {path}: not a state dict (expected names mapped to tensors, bare or "
            f"under {' or '.join(_WRAPPERS)}); save one with torch.save(model.state_dict(), FILE)"
        )
    return {_strip(k): v for k, v in saved.items()}


def load_pretrained(path: Path, state: StateDict, *, model: str) -> StateDict:
    """`state` with every tensor of `path` whose name and shape match copied in.

    Args:
        state: the network's initial state dict (not changed).
        model: the network's name, for the messages.

    """
    weights = read_state_dict(path)
    merged = dict(state)
    loaded, skipped = 0, []
    for key, value in weights.items():
        if key not in merged:
            continue
        if tuple(value.shape) != tuple(merged[key].shape):
            skipped.append(f"{key} {tuple(value.shape)} != {tuple(merged[key].shape)}")
            continue
        merged[key] = value.detach().to(merged[key].dtype).clone()
        loaded += 1
    if loaded == 0:
        raise ConfigError(
            f"--pretrained {path}: no layer of {path.name} matches --model {model} (none of its "
            f"{len(weights)} tensors has a name and shape of the network's); pass weights "
            f"trained with --model {model}, or the --model they were trained with"
        )
    ignored = sum(k not in state for k in weights)
    log.log(
        logging.WARNING if skipped else logging.INFO,
        "--pretrained %s: loaded %d of the %d tensors of --model %s%s%s", path, loaded,
        len(state), model,
        f"; kept the initial weights of {len(skipped)} whose shape differs: "
        + ", ".join(skipped) if skipped else "",
        f"; ignored {ignored} tensors of the file the network has no place for" if ignored else "",
    )
    return merged
