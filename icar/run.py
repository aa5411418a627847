"""`run(cfg) -> metrics`: train one model and analyse it, what scripts, sweeps, searches, tests and notebooks call.

Training (icar.training.run.train) knows nothing of the analyses; they join as a callback when `eval.analysis` is on,
and their numbers join the returned metrics (and summary.json) as `analysis/<name>`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from icar.analysis.callback import AnalysisCallback
from icar.config import TrainConfig
from icar.training.config_io import to_dataclass
from icar.training.run import train


def run(cfg: DictConfig | TrainConfig | dict[str, Any], callbacks: list[Callback] | None = None,
        devices: list[int] | None = None, strategy: str | None = None) -> dict[str, float]:
    """Train (`icar.training.run.train`: its arguments) and, when `cfg.eval.analysis`, analyse the model at the end of
    training (and after every `eval.analysis_every`-th validation) into RUN/analysis/."""
    cfg = to_dataclass(cfg)
    extra = list(callbacks or [])
    if cfg.eval.analysis:
        run_dir = Path(cfg.run_dir or os.getcwd()).absolute()
        extra.append(AnalysisCallback(run_dir, cfg.eval.analysis_every, cfg.trainer.val_check_interval))
    return train(cfg, extra, devices, strategy)
