"""Figure 4: `python scripts/fig4.py [key=value ...]` (see conf/fig4.yaml); writes into runs/fig4/<time>/."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from icar.claims.fig4 import run_fig4, to_fig4_config
from icar.config import ConfigError
from icar.orchestration.hydra_config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="fig4")
def main(cfg: DictConfig) -> dict:
    """Validate first (one line naming the key), then compute, plot and record."""
    try:
        to_fig4_config(cfg)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    n = run_fig4(cfg)
    print(f"fig4: exact fits {n.sets['real'].fraction_exact:.2%} real vs {n.sets['shuffled'].fraction_exact:.2%} "
          f"shuffled of {n.n_windows} windows; {cfg.run_dir}")
    return n.to_json()


if __name__ == "__main__":
    main()
