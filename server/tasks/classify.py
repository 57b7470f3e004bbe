"""Classification at the aggregator: central AUC; initial weights (--pretrained, --init-encoder)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.config import ConfigError, RunConfig
from common.modelfile import load_model_file
from models.autoencoder import classifier_init
from server.central import CentralEvaluator
from server.pretrained import load_pretrained
from server.tasks.base import DefaultSteps, Evaluator, StateDict

MODEL_FILE = "model.pt"


def load_encoder_run(run_dir: Path) -> StateDict:
    """The final weights of a finished `--task autoencode` run."""
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise ConfigError(
            f"--init-encoder {run_dir}: no {MODEL_FILE} there; pass the --out folder of a "
            "finished `medfed simulate --task autoencode` run"
        )
    saved = load_model_file(path, what="--init-encoder model")
    if saved.get("config", {}).get("task") != "autoencode":
        raise ConfigError(
            f"--init-encoder {run_dir}: that run trained --task "
            f"{saved.get('config', {}).get('task')}, not autoencode"
        )
    state: StateDict = saved["state_dict"]
    return state


class ClassifyCentral(DefaultSteps):
    """Central AUC on labelled held-out images."""

    def initial_state(self, cfg: RunConfig) -> StateDict:
        """Seeded weights, then --pretrained's matching layers or --init-encoder's encoder."""
        state = super().initial_state(cfg)
        if cfg.pretrained:
            state = load_pretrained(Path(cfg.pretrained), state, model=cfg.model)
        if not cfg.init_encoder:
            return state
        try:
            return classifier_init(load_encoder_run(Path(cfg.init_encoder)), state)
        except ValueError as exc:
            raise ConfigError(f"--init-encoder {cfg.init_encoder}: {exc}") from None

    def evaluator(self, cfg: RunConfig, site_dirs: Sequence[Path]) -> Evaluator | None:
        """AUC, accuracy, sensitivity, specificity."""
        return CentralEvaluator.from_config(cfg, site_dirs)
