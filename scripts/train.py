"""One training run: `python scripts/train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from icar.config import ConfigError, register_configs, to_dataclass, validate

register_configs()
STARTED = ("metrics.jsonl", "checkpoints", "summary.json")  # what a run that trained leaves in its folder


class JobFailed(CompactHydraException):
    """A sweep job's one-line failure: Hydra prints the line instead of a traceback, a sweeper records the job."""


def remove_if_unstarted(output_dir: str) -> None:
    """A launch refused before training leaves no run folder: remove Hydra's if nothing in it shows training."""
    folder = Path(output_dir)
    if folder.is_dir() and not any((folder / name).exists() for name in STARTED):
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # runs/<name>/ too, when this was its only run
        except OSError:
            pass


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, float]:
    """Validate first (fast, before Lightning is imported: the values, then whether the run fits in memory), then
    train; return the final metrics, from which a sweeper takes its objective (`val/mse` by default). Outside a
    sweep a failure is one line and exit 1 and a finished run ends on a closing block; in a sweep the job's failure
    is recorded in its folder (failure.txt) and the sweep goes on."""
    from icar.failures import RunFailure, failure_line, record_failure
    from icar.memory import check_memory

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        train_cfg = to_dataclass(cfg)
        validate(train_cfg)
        check_memory(train_cfg)
    except ConfigError as err:
        if multirun:  # one failed job (an Optuna sweep records the trial as failed and goes on), not the whole sweep
            record_failure(Path(output_dir), f"config error: {err}")
            raise JobFailed(f"config error: {err}") from None
        remove_if_unstarted(output_dir)
        sys.exit(f"config error: {err}")
    from lightning.pytorch.utilities import rank_zero_only

    from icar.closing import closing_block
    from icar.train import run
    from icar.tuning import trial_callbacks

    start = time.monotonic()
    try:
        metrics = run(cfg, callbacks=trial_callbacks())
    except (ConfigError, RunFailure) as err:
        line = failure_line(err) or str(err)
        if multirun:
            raise JobFailed(line) from err
        remove_if_unstarted(output_dir)
        sys.exit(line)
    if not multirun and rank_zero_only.rank == 0:
        layers = 1 if train_cfg.model.arch.value == "diagonal" else train_cfg.model.n_layers
        print(closing_block(metrics, Path(train_cfg.run_dir or output_dir), layers, time.monotonic() - start),
              flush=True)
    return metrics


if __name__ == "__main__":
    main()
