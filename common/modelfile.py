"""Reading model files without unpickling them: a model file from elsewhere never runs code.

A `model.pt` can come from the aggregator's log stream, a colleague or a download; `torch.save`
writes a pickle, and a full unpickler runs whatever a crafted file names (`os.system`, ...).
Every model, checkpoint and reference file medfed reads goes through `load_torch_file`, which
uses torch's restricted unpickler (`weights_only=True`: tensors, dicts, lists, str, int, float,
bool, None only). A file that needs anything else is refused, naming the file; what medfed itself
saves (`server.record.RunRecord.save_model`: tensors and plain values) always loads.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ConfigError


class UnsafeModelFile(ConfigError):
    """A model file that is not plain tensors and values (or not a model file at all)."""


def load_torch_file(path: Path, *, what: str = "model file") -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; UnsafeModelFile names the file otherwise.

    what: how the error names the file ("model file", "--init-encoder model", ...).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message names the global the file asked for (e.g. posix.system): keep that
        # line, it tells the reader what the file tried to do; not its advice to unpickle
        named = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        detail = named[0] if named else "content torch's safe loader does not accept"
        raise UnsafeModelFile(
            f"{path}: refused to load this {what}: it holds more than tensors and plain values "
            f"({detail}). medfed never unpickles model files, because a crafted one runs code; "
            "use a model.pt written by medfed, or re-save the weights as a plain state dict"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise UnsafeModelFile(
            f"{path}: cannot read this {what} ({type(exc).__name__}: {exc}); it is truncated "
            "or not a torch file: copy it again from the run folder"
        ) from None


def load_npz(path: Path, *, what: str = "checkpoint file") -> dict[str, np.ndarray]:
    """Every array of an .npz, never unpickling (object arrays are refused), naming the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as exc:
        raise UnsafeModelFile(
            f"{path}: refused to load this {what}: {exc}. medfed never unpickles arrays; "
            "restore the checkpoint medfed wrote, or start a new run"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UnsafeModelFile(
            f"{path}: cannot read this {what} ({type(exc).__name__}: {exc}); it is truncated "
            "or not an .npz: restore it, or start a new run instead of --resume"
        ) from None


def load_model_file(path: Path, *, what: str = "model file") -> dict[str, Any]:
    """A medfed `model.pt` (model name, model_args, state_dict, config), checked for its shape."""
    saved = load_torch_file(path, what=what)
    shape_ok = (
        isinstance(saved, dict)
        and isinstance(saved.get("model"), str)
        and isinstance(saved.get("model_args"), dict)
        and isinstance(saved.get("state_dict"), dict)
        and all(isinstance(v, torch.Tensor) for v in saved["state_dict"].values())
        and isinstance(saved.get("config", {}), dict)
    )
    if not shape_ok:
        raise UnsafeModelFile(
            f"{path}: not a medfed model file (expected model, model_args, state_dict and "
            "config, as `medfed simulate` writes them); pass the model.pt of a finished run"
        )
    return dict(saved)
