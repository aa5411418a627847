"""`train(cfg) -> metrics`: one training run, a function of its arguments alone.

The run folder (`cfg.run_dir`, default: the current directory) receives config.yaml, metrics.jsonl,
checkpoints/{last,best}.ckpt (and interrupted.ckpt if the run is stopped), summary.json and the W&B run; a run that
ends early also failure.txt, the one line of why. What a sweep adds (a W&B group and tags, a GPU of its own, ddp_spawn
inside a local sweep) is decided by its caller (icar.orchestration.job) and arrives in `cfg` and `devices`; the
analyses arrive as a callback (icar.run).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from icar import metrics as names
from icar.config import ConfigError, TrainConfig, available_devices, validate
from icar.training.datamodule import ARDataModule
from icar.training.callbacks import CheckpointOnInterrupt, StepProgressBar, ValidateAtEnd
from icar.training.checkpoint_io import AtomicCheckpointIO, CheckpointError, read_checkpoint
from icar.training.config_io import to_dataclass, to_plain_dict
from icar.training.console import quiet_lightning
from icar.training.ddp import RankWatchdog, collective_failure, ddp_strategy, is_collective_failure, kill_child_ranks
from icar.training.failures import Interrupted, clear_failure, failure_line, record_failure
from icar.training.guards import Diverged, DivergenceGuard, finite_or_none, is_being_requeued
from icar.training.loggers import build_loggers
from icar.training.memory import check_memory
from icar.training.module import ICARModule
from icar.training.resume import check_resume, record_resume, truncate_metrics
from icar.training.slurm import cluster_plugins, requeue_callbacks, requeued_checkpoint
from icar.training.wandb_resume import complete_offline_history

log = logging.getLogger(__name__)


def keep_freed_memory() -> None:
    """glibc: keep freed blocks below 32 MB in the heap instead of returning them to the OS. CPU training allocates
    the same activations every step, and re-mapping them page-faults (the Figure 7 config: 1.2-1.6x slower)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


@runtime_checkable
class ReportsMetrics(Protocol):
    """A callback whose numbers join the run's final metrics (summary.json), e.g. the analyses (icar.run)."""

    def final_metrics(self) -> dict[str, float]: ...


def train(cfg: DictConfig | TrainConfig | dict[str, Any], callbacks: list[Callback] | None = None,
          devices: list[int] | None = None, strategy: str | None = None) -> dict[str, float]:
    """Train one model from a config; return the final scalar metrics (also saved as summary.json).

    `callbacks` are added to the run's own (checkpoints, progress bar): the analyses, a search's pruning; the numbers
    of those that implement `ReportsMetrics` join the result. `devices`: the device indices to train on (a parallel
    sweep's claimed GPUs) instead of `trainer.devices` of them; `strategy`: Lightning's strategy instead of
    `trainer.strategy` (ddp_spawn inside a local sweep), left out of the recorded config, so a resume compares like
    with like.
    """
    cfg = to_dataclass(cfg)
    run_dir = Path(cfg.run_dir or os.getcwd()).absolute()
    quiet_lightning()
    try:
        metrics = _train(cfg, run_dir, callbacks or [], devices, strategy)
    except BaseException as err:
        line = failure_line(err)
        # a resume refused before it trained leaves the original run's folder as it was
        refused_resume = cfg.ckpt_path is not None and isinstance(err, (ConfigError, CheckpointError))
        if line is not None and rank_zero_only.rank == 0 and not refused_resume:
            record_failure(run_dir, line)
        raise
    if rank_zero_only.rank == 0:
        clear_failure(run_dir)
    return metrics


def _train(cfg: TrainConfig, run_dir: Path, extra: list[Callback], devices: list[int] | None,
           strategy: str | None) -> dict[str, float]:
    validate(cfg)
    check_memory(cfg, device_claimed=devices is not None)
    cfg.ckpt_path = cfg.ckpt_path or requeued_checkpoint(run_dir)  # a requeued SLURM job continues where it stopped
    config = to_plain_dict(cfg)
    resumed = read_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    diff = check_resume(dict(resumed["hyper_parameters"]), config, cfg.resume_override) if resumed else {}
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resumed is None or not (run_dir / "config.yaml").exists():  # the original's config is never rewritten
            OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
        if resumed is not None:
            record_resume(run_dir, cfg.ckpt_path, resumed["global_step"], diff, cfg.resume_override)
            truncate_metrics(run_dir, resumed["global_step"])  # the resumed steps log them again: theirs win
    resumed_step = None if resumed is None else int(resumed["global_step"])
    del resumed
    if available_devices(cfg.trainer.accelerator)[0] == "cpu":
        keep_freed_memory()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them

    with torch.random.fork_rng(devices=[]):  # model initialisation from `seed`, global state left alone
        torch.manual_seed(cfg.seed)
        module = ICARModule(config)
    datamodule = ARDataModule(cfg.data, cfg.seed)
    loggers = build_loggers(cfg.logger, run_dir, f"{cfg.name}/{run_dir.name}", config)
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        *extra,
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=names.CHECKPOINT_MONITOR, mode="min"),
        # last.ckpt: the newest validated weights. Not save_last=True: Lightning 2.6 writes that one only when the
        # monitored checkpoint improves, so a run whose last validation was not its best kept older weights there.
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False),
        CheckpointOnInterrupt(ckpt_dir / "interrupted.ckpt"),
        *requeue_callbacks(),  # after CheckpointOnInterrupt: requeue once the checkpoint is written
        ValidateAtEnd(),
        DivergenceGuard(),
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(StepProgressBar(cfg.trainer.max_steps))
    if len(loggers) > 1:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.append(RankWatchdog(run_dir))  # several ranks: SIGTERM ends them even when one is frozen
    t = cfg.trainer
    strategy = ddp_strategy(strategy or t.strategy, t.devices * t.num_nodes, t.ddp_timeout_s)  # collectives: ddp_timeout_s
    trainer = pl.Trainer(
        accelerator=t.accelerator,
        devices=devices if devices is not None else t.devices,
        strategy=strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        max_steps=t.max_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        gradient_clip_val=cfg.optim.grad_clip or None,
        logger=loggers,
        callbacks=callbacks,
        use_distributed_sampler=False,  # the DataModule shards validation itself, without padding
        default_root_dir=str(run_dir),
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
    )
    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if rank_zero_only.rank == 0:
        for lg in wandb_loggers:
            lg.experiment  # create the run in this process, before any fork (ddp_fork, multirun jobs)
            if resumed_step is not None and lg.experiment.settings.mode == "offline":
                complete_offline_history(lg.experiment, run_dir, resumed_step)  # what a killed segment lost
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except SIGTERMException:  # Lightning's SystemExit without a code: exit 0 would tell a scheduler "done"
        if is_being_requeued(run_dir):
            raise
        line = f"stopped by SIGTERM at step {trainer.global_step}; resume with" \
               f" ckpt_path={ckpt_dir / 'interrupted.ckpt'}"
        if trainer.is_global_zero:
            print(line, file=sys.stderr, flush=True)
        raise Interrupted(line) from None
    except Diverged as err:
        if trainer.is_global_zero:
            write_summary(run_dir, {"diverged": True, "diverged_step": err.step,
                                    "diverged_value": str(err.value), "global_step": trainer.global_step})
        raise
    except Exception as err:
        if trainer.world_size > 1:  # this rank is ending: the ranks it started (frozen or stuck) must not outlive
            kill_child_ranks(trainer)  # it, holding its output pipes open
        if not (trainer.world_size > 1 and is_collective_failure(err)):
            raise
        saved = trainer.is_global_zero and (ckpt_dir / "interrupted.ckpt").exists()  # by CheckpointOnInterrupt
        raise collective_failure(err, trainer, t.ddp_timeout_s,
                                 ckpt_dir / ("interrupted.ckpt" if saved else "last.ckpt")) from None
    finally:
        if wandb_loggers and rank_zero_only.rank == 0:
            import wandb

            try:
                wandb.finish()  # one W&B run per Hydra job: the next job must not log into this one
            except Exception as err:  # its service is gone: SLURM signals every process of a job, wandb-core too
                log.warning(f"W&B run not finished cleanly ({type(err).__name__}: {err}); metrics.jsonl is complete")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics[names.GLOBAL_STEP] = float(trainer.global_step)
    for callback in extra:
        if isinstance(callback, ReportsMetrics):
            metrics.update(callback.final_metrics())
    if trainer.is_global_zero:
        write_summary(run_dir, metrics)
    return metrics


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json in strict JSON: a non-finite number is null."""
    summary = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in summary.items()}
    (run_dir / names.SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
