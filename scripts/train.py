"""One training run: `python scripts/train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from icar.config import ConfigError, register_configs, to_dataclass, validate

register_configs()


def remove_if_unstarted(output_dir: str) -> None:
    """A launch refused before training leaves no run folder: remove Hydra's if it holds only `.hydra/` and its log."""
    folder = Path(output_dir)
    if folder.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, float]:
    """Validate first (fast, before Lightning is imported), then train; return the final metrics, from which a
    sweeper takes its objective (`val/mse` by default). Outside a sweep a failure is one line and exit 1."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        validate(to_dataclass(cfg))
    except ConfigError as err:
        if multirun:
            raise  # one failed job (an Optuna sweep records the trial as failed and goes on), not the whole sweep
        remove_if_unstarted(HydraConfig.get().runtime.output_dir)
        sys.exit(f"config error: {err}")
    from icar.guards import RunFailure
    from icar.train import run
    from icar.tuning import trial_callbacks

    try:
        return run(cfg, callbacks=trial_callbacks())
    except (ConfigError, RunFailure) as err:
        if multirun:
            raise
        remove_if_unstarted(HydraConfig.get().runtime.output_dir)
        prefix = "config error: " if isinstance(err, ConfigError) else ""
        sys.exit(f"{prefix}{err}")


if __name__ == "__main__":
    main()
