"""One Hydra job (`scripts/train.py`, alone or in a sweep): everything a job learns from Hydra is read here and
handed to the run as arguments, so that `icar.run.run(cfg)` stays a function of its config.

From Hydra it takes the sweep a job belongs to (its W&B group and the swept values as tags), which launcher runs
it (ddp_spawn instead of ddp inside a local sweep; a GPU of its own in a parallel one) and whether a failure ends the
process (a single run: one line, exit 1) or only the job (a sweep: failure.txt, the sweep goes on).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from icar.config import ConfigError, TrainConfig, TrainerConfig, n_layers, validate
from icar.orchestration.closing import closing_block
from icar.orchestration.devices import claim_devices, parallel_sweep_lock_dir, sweep_launcher
from icar.orchestration.resumable import EarlierFailure, earlier_outcome, swept_keys
from icar.training.config_io import to_dataclass
from icar.training.failures import RunFailure, failure_line, record_failure
from icar.training.memory import check_memory

log = logging.getLogger(__name__)
STARTED = ("metrics.jsonl", "checkpoints", "summary.json")  # what a run that trained leaves in its folder
TAG_LENGTH = 64  # W&B's limit on a tag


class JobFailed(CompactHydraException):
    """A sweep job's one-line failure: Hydra prints the line instead of a traceback, a sweeper records the job."""


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep: its folder below `multirun/` (`sweep_depth/2026-11-23_10-00-00`), else its name."""
    parts = Path(sweep_dir).absolute().parts
    return "/".join(parts[parts.index("multirun") + 1:]) if "multirun" in parts[:-1] else parts[-1]


def sweep_context() -> tuple[str, dict[str, str]] | None:
    """For a job of a Hydra multirun: its sweep's W&B group and the values of its swept keys; None otherwise.

    The swept keys are those of `hydra.sweeper.params` and those swept on the sweep's command line (read from the
    `multirun.yaml` the sweeper saved); without either, every override of the job.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    keys = swept_keys(hydra_cfg)
    swept = {}
    for line in hydra_cfg.overrides.task:
        key, _, value = line.partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra.") and (not keys or key in keys):
            swept[key] = value
    return sweep_group(hydra_cfg.sweep.dir), swept


def job_devices(t: TrainerConfig) -> tuple[list[int] | None, str, contextlib.ExitStack]:
    """The GPUs this job claims (None: `trainer.devices` of them), its strategy, and what it holds until it ends.

    In a sweep whose jobs run in parallel on one machine (joblib: hydra/launcher=gpus), a GPU job takes free GPUs
    of its own (`icar.orchestration.devices.claim_devices`). In any local sweep, multi-device DDP uses ddp_spawn:
    plain ddp re-executes the command line for every rank, which would restart the sweep (SLURM starts its own ranks).
    """
    held = contextlib.ExitStack()
    devices: list[int] | None = None
    strategy = t.strategy
    lock_dir = parallel_sweep_lock_dir()
    if lock_dir is not None and torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda"):
        devices = held.enter_context(claim_devices(t.devices, torch.cuda.device_count(), lock_dir))
        log.info(f"this sweep job trains on GPU {devices}")
    launcher = sweep_launcher()
    if launcher is not None and "submitit" not in launcher and t.devices * t.num_nodes > 1 \
            and strategy in ("auto", "ddp"):
        strategy = "ddp_spawn"
        log.info("multi-device run inside a local sweep: strategy ddp_spawn instead of ddp")
    return devices, strategy, held


def with_sweep_context(cfg: TrainConfig) -> TrainConfig:
    """A sweep's runs share one W&B group and are tagged with their swept values (`model.n_layers=3`)."""
    sweep = sweep_context()
    if sweep is not None:
        group, swept = sweep
        cfg.logger.group = cfg.logger.group or group
        cfg.logger.tags = [*cfg.logger.tags, *(f"{k}={v}"[:TAG_LENGTH] for k, v in swept.items())]
    return cfg


def remove_if_unstarted(output_dir: str) -> None:
    """A launch refused before training leaves no run folder: remove Hydra's if nothing in it shows training."""
    folder = Path(output_dir)
    if folder.is_dir() and not any((folder / name).exists() for name in STARTED):
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # runs/<name>/ too, when this was its only run
        except OSError:
            pass


def run_job(cfg: DictConfig) -> dict[str, float]:
    """Validate first (the values, then whether the run fits in memory), then train and analyse; return the final
    metrics, from which a sweeper takes its objective (`val/mse` by default). Outside a sweep a failure is one line
    and exit 1 and a finished run ends on a closing block; in a sweep the job's failure is recorded in its folder
    (failure.txt) and the sweep goes on."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    output_dir = HydraConfig.get().runtime.output_dir
    try:
        train_cfg = to_dataclass(cfg)
        validate(train_cfg)
        if multirun:  # a job of a sweep run into its folder before: skip it if it ended, else resume it
            try:
                earlier = earlier_outcome(Path(train_cfg.run_dir or output_dir), train_cfg)
            except (EarlierFailure, ConfigError) as err:  # the folder is left exactly as it was
                raise JobFailed(str(err)) from None
            if earlier is not None:
                return earlier
        check_memory(train_cfg, device_claimed=parallel_sweep_lock_dir() is not None)
    except ConfigError as err:
        if multirun:  # one failed job (an Optuna sweep records the trial as failed and goes on), not the whole sweep
            record_failure(Path(output_dir), f"config error: {err}")
            raise JobFailed(f"config error: {err}") from None
        remove_if_unstarted(output_dir)
        sys.exit(f"config error: {err}")
    # Lightning is imported only once the config is valid: a bad value is refused in about 2 s instead of 6
    from lightning.pytorch.utilities import rank_zero_only

    from icar.orchestration.tuning import trial_callbacks
    from icar.run import run

    train_cfg = with_sweep_context(train_cfg)
    devices, strategy, held = job_devices(train_cfg.trainer)
    start = time.monotonic()
    try:
        with held:  # the GPUs this job holds in a parallel sweep, released however the run ends
            metrics = run(train_cfg, callbacks=trial_callbacks(), devices=devices, strategy=strategy)
    except (ConfigError, RunFailure) as err:
        line = failure_line(err) or str(err)
        if multirun:
            raise JobFailed(line) from err
        remove_if_unstarted(output_dir)
        sys.exit(line)
    if not multirun and rank_zero_only.rank == 0:
        print(closing_block(metrics, Path(train_cfg.run_dir or output_dir), n_layers(train_cfg.model),
                            time.monotonic() - start),
              flush=True)
    return metrics
