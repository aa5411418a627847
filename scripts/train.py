"""One training run: `python scripts/train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from icar.config import ConfigError, register_configs, to_dataclass, validate

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, float]:
    """Validate first (fast, before Lightning is imported), then train; return the final metrics, from which a
    sweeper takes its objective (`val/mse` by default)."""
    try:
        validate(to_dataclass(cfg))
    except ConfigError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # one failed job (an Optuna sweep records the trial as failed and goes on), not the whole sweep
        sys.exit(f"config error: {err}")
    from icar.train import run
    from icar.tuning import trial_callbacks

    return run(cfg, callbacks=trial_callbacks())


if __name__ == "__main__":
    main()
