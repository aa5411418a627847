"""One training run: `python scripts/train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from icar.orchestration.hydra_config import register_configs
from icar.orchestration.job import run_job

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, float]:
    return run_job(cfg)


if __name__ == "__main__":
    main()
