"""One training run: `python scripts/train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from icar.config import ConfigError, register_configs, to_dataclass, validate

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Validate first (fast, before Lightning is imported), then train; return val/mse for sweepers."""
    try:
        validate(to_dataclass(cfg))
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    from icar.train import run

    return run(cfg).get("val/mse")


if __name__ == "__main__":
    main()
