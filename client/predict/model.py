"""The model `medfed predict` applies: a run's model.pt, loaded without unpickling and rebuilt.

A run folder or a model.pt path is accepted. The file is read by `common.modelfile` (tensors and
plain values only: a crafted file is refused), the network is rebuilt from its saved
`model_args` and must take the saved weights exactly, and the run's settings say how images are
prepared (size, channels, 2D or 3D) and which operating point a classifier decides at.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from common.config import ConfigError, RunConfig
from common.modelfile import UnsafeModelFile, load_model_file
from common.registry import Task
from models import build_model

MODEL_FILE = "model.pt"
# the tasks whose outputs predict knows how to write
PREDICTABLE = (Task.classify.value, Task.segment.value)


@dataclass
class Predictor:
    """A rebuilt model in eval mode with the settings it was trained with.

    threshold: a binary classifier's operating point on P(class 1) (model.pt's, chosen on the
        sites' validation splits), else 0.5; unused for other tasks.
    """

    model: nn.Module
    cfg: RunConfig
    threshold: float
    source: Path
    round: int


def model_path(given: Path) -> Path:
    """The model.pt a MODEL_OR_RUN_DIR argument names; FileNotFoundError says what to pass."""
    if given.is_dir():
        path = given / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{given}: no {MODEL_FILE} in this folder; pass a finished run folder (the --out "
                "of `medfed simulate`, or a deployed run's folder) or the model.pt itself"
            )
        return path
    if not given.is_file():
        raise FileNotFoundError(
            f"{given}: no such file or folder; pass a run folder or its {MODEL_FILE}"
        )
    return given


def load_predictor(given: Path) -> Predictor:
    """Read, check and rebuild the model named by `given` (a run folder or a model file)."""
    path = model_path(given)
    saved = load_model_file(path)
    try:
        cfg = RunConfig.from_mapping(saved.get("config", {}), strict=False)
    except (ConfigError, ValueError, TypeError) as exc:
        raise UnsafeModelFile(
            f"{path}: the run settings stored in this model file are not usable ({exc}); "
            "pass a model.pt written by medfed"
        ) from None
    if cfg.task not in PREDICTABLE:
        raise ConfigError(
            f"{path}: this model was trained with --task {cfg.task}; `medfed predict` applies "
            f"{' and '.join(PREDICTABLE)} models (use `medfed sample` for a GAN)"
        )
    try:
        model = build_model(saved["model"], **saved["model_args"])
        model.load_state_dict(saved["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeModelFile(
            f"{path}: the weights do not fit the network this file describes "
            f"({saved['model']}: {first}); the file is damaged or was edited: copy model.pt "
            "again from the run folder"
        ) from None
    threshold = float(saved.get("threshold", 0.5))
    if not 0.0 <= threshold <= 1.0:
        raise UnsafeModelFile(
            f"{path}: operating point {threshold} is not a probability; the file was edited"
        )
    return Predictor(model.eval(), cfg, threshold, path, int(saved.get("round", 0)))
