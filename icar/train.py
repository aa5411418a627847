"""Training: the one LightningModule (next-token MSE, validation beside the in-context baselines, optimiser) and
`run(cfg) -> metrics`, which scripts, tests and sweeps call in-process.

MSE is per token: ||s_hat_{t+1} - s_{t+1}||^2 summed over coordinates (complex: squared modulus), averaged over
sequences and over the predicted positions t >= model.first_position (docs/PAPER_NOTES.md §1.5).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from icar.analysis.callback import AnalysisCallback
from icar.baselines import InContextBaselines
from icar.callbacks import CheckpointOnInterrupt, StepProgressBar, ValidateAtEnd
from icar.checkpoint_io import AtomicCheckpointIO, CheckpointError, read_checkpoint
from icar.config import (
    ConfigError,
    LossOn,
    Optimizer,
    Schedule,
    TrainConfig,
    TrainerConfig,
    available_devices,
    to_dataclass,
    to_plain_dict,
    validate,
)
from icar.console import quiet_lightning
from icar.data.datamodule import ARDataModule
from icar.data.sequences import SequenceSampler
from icar.data.tokens import encode_tokens, realify
from icar.ddp import RankWatchdog, collective_failure, ddp_strategy, is_collective_failure, kill_child_ranks
from icar.devices import claim_devices, parallel_sweep_lock_dir, sweep_launcher
from icar.failures import Interrupted, clear_failure, failure_line, record_failure
from icar.guards import Diverged, DivergenceGuard, finite_or_none, is_being_requeued
from icar.logging import build_loggers, log_curves, sweep_context
from icar.memory import check_memory
from icar.models import build_model
from icar.resume import check_resume, record_resume, truncate_metrics
from icar.slurm import cluster_plugins, requeue_callbacks, requeued_checkpoint
from icar.wandb_resume import complete_offline_history

log = logging.getLogger(__name__)


class ICARModule(pl.LightningModule):
    """Trains one model on streamed sequences; its hyperparameters are the whole resolved config (a plain dict)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(config)  # goes to the checkpoint and, once, to every logger
        self.cfg: TrainConfig = to_dataclass(config)
        self.model = build_model(self.cfg.model, self.cfg.data)
        self.baselines = InContextBaselines(self.cfg.eval.gd_steps, self.cfg.data.T)
        self.t0 = self.model.first_position - 1  # first predicted position, 0-based
        self._val_sums: dict[str, torch.Tensor] = {}
        self._baseline_sums: dict[str, torch.Tensor] | None = None  # this rank's, after its first full validation
        self.val_curves: dict[str, list[float]] = {}  # the last validation's per-position MSE, "model" and baselines

    # -- the forward pass shared by training, validation and analysis ------------------------------------------
    def predict_sequences(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences s_1..s_{T+1} (B, T+1, d) -> (predictions, targets) of s_2..s_{T+1}, both (B, T, d')."""
        inputs, targets = s[:, :-1], s[:, 1:]
        if not self.model.accepts_complex:
            inputs, targets = realify(inputs), realify(targets)
            return self.model(encode_tokens(inputs, self.cfg.data.tokens)), targets
        return self.model(inputs), targets

    @staticmethod
    def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-token squared error (B, T): summed over coordinates."""
        return (pred - target).abs().square().sum(-1)

    def tune_baselines(self) -> None:
        """Tune GD's step sizes once, on CPU, on held-out sequences from data.val_seed + 1 (as many as validation).

        Every rank computes the same values; a resumed run or a loaded checkpoint keeps them."""
        if self.baselines.tuned:
            return
        g = torch.Generator().manual_seed(self.cfg.data.val_seed + 1)
        s, _ = SequenceSampler(self.cfg.data).sample(self.cfg.data.val_size, g)
        self.baselines.tune(s)

    def baseline_errors(self, s: torch.Tensor, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token squared errors (B, T) of every baseline on sequences s_1..s_{T+1} (B, T+1, d)."""
        target = s[:, 1:]
        return {name: self.squared_error(pred, target) for name, pred in self.baselines(s[:, :-1], W).items()}

    def on_validation_start(self) -> None:
        self.tune_baselines()  # once (also for trainer.validate on a fresh module); a no-op when restored

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gd_eta"] = self.baselines.gd_eta  # GD's tuned step sizes: a resumed or analysed run reuses them

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "gd_eta" in checkpoint:
            self.baselines.gd_eta = checkpoint["gd_eta"].to("cpu", torch.float64)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        s, _ = batch
        pred, target = self.predict_sequences(s)
        err = self.squared_error(pred, target)  # (B, T)
        loss = err[:, -1].mean() if self.cfg.loss_on == LossOn.last else err[:, self.t0 :].mean()
        if self._logs_this_step():
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this step's metrics (every trainer.log_every_n_steps-th step, as its logger
        connector counts them) or it is the last: `self.log` costs about 1 ms a call on CPU (4% of a Figure 5 step),
        and a value logged on the other steps would never be written. The progress bar shows the latest one."""
        try:
            trainer = self.trainer
        except RuntimeError:  # called without a Trainer (a notebook, a test): `self.log` decides
            return True
        step = self.global_step + 1  # this step's number once it has stepped (one optimiser, no accumulation)
        return step % max(1, trainer.log_every_n_steps) == 0 or step >= (trainer.max_steps or 0)

    # -- validation: exact sums over the whole validation set, reduced across ranks ----------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def _accumulate(self, name: str, err: torch.Tensor) -> None:
        total = err.sum(0)  # (T,)
        self._val_sums[name] = self._val_sums.get(name, torch.zeros_like(total)) + total

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        s, W = batch
        pred, target = self.predict_sequences(s)
        self._accumulate("model", self.squared_error(pred, target))
        if self._baseline_sums is None:  # the validation set and the baselines never change: computed once
            for name, err in self.baseline_errors(s, W).items():
                self._accumulate(name, err.to(target.real.dtype))
        self._accumulate("count", torch.full_like(target[..., 0].real, 1.0))

    def on_validation_epoch_end(self) -> None:
        if self._baseline_sums is not None:
            self._val_sums.update(self._baseline_sums)
        elif not self.trainer.sanity_checking:  # a full pass over this rank's share: keep its baseline sums
            self._baseline_sums = {n: v for n, v in self._val_sums.items() if n not in ("model", "count")}
        names = sorted(self._val_sums)
        stacked = torch.stack([self._val_sums[n] for n in names])  # (n_curves, T): this rank's sums
        stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")  # every rank's sequences, each once
        sums = dict(zip(names, stacked))
        count = sums.pop("count")  # (T,): number of sequences
        curves = {n: v / count for n, v in sums.items()}  # per-position MSE
        if not self.trainer.sanity_checking:
            self.val_curves = {n: c.tolist() for n, c in curves.items()}
        for name, curve in curves.items():
            prefix = "val" if name == "model" else f"val/{name}"
            # already reduced over ranks; sync_dist averages identical values (and silences Lightning's warning)
            self.log(f"{prefix}/mse", curve[self.t0 :].mean(), prog_bar=name == "model", sync_dist=True)
            self.log(f"{prefix}/mse_last", curve[-1], sync_dist=True)
        if not self.trainer.sanity_checking and self.trainer.loggers:
            positions = list(range(1, len(count) + 1))
            labelled = {("val/mse_by_pos" if n == "model" else f"val/{n}/mse_by_pos"): c for n, c in curves.items()}
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs val/* under
            log_curves(self.trainer.loggers, step, positions, labelled, "val/mse_by_pos")

    # -- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        o, max_steps = self.cfg.optim, self.cfg.trainer.max_steps
        if o.optimizer == Optimizer.sgd:
            optimizer = torch.optim.SGD(self.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        elif o.weight_decay:
            optimizer = torch.optim.AdamW(self.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=o.lr)

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            if o.schedule == Schedule.cosine:
                progress = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
                return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


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


def sweep_job_devices(t: TrainerConfig) -> tuple[int | list[int], str, contextlib.ExitStack]:
    """Devices and strategy of this job, and what it holds until it ends.

    In a sweep whose jobs run in parallel on one machine (joblib: hydra/launcher=gpus), a GPU job takes free GPUs
    of its own (`icar.devices.claim_devices`). In any local sweep, multi-device DDP uses ddp_spawn: plain ddp
    re-executes the command line for every rank, which would restart the sweep (SLURM starts its own ranks).
    """
    held = contextlib.ExitStack()
    devices: int | list[int] = t.devices
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


def run(cfg: DictConfig | TrainConfig | dict[str, Any], callbacks: list[Callback] | None = None) -> dict[str, float]:
    """Train one model from a config; return the final scalar metrics (also saved as summary.json).

    `callbacks` are added to the run's own (checkpoints, progress bar): e.g. a pruning callback of a search.

    The run folder (`run_dir`, default: the current directory) receives config.yaml, metrics.jsonl,
    checkpoints/{last,best}.ckpt (and interrupted.ckpt if the run is stopped), summary.json and the W&B run; a run
    that ends early also failure.txt, the one line of why (a resume that finishes removes it).
    """
    cfg = to_dataclass(cfg)
    run_dir = Path(cfg.run_dir or os.getcwd()).absolute()
    quiet_lightning()
    try:
        metrics = _train(cfg, run_dir, callbacks)
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


def _train(cfg: TrainConfig, run_dir: Path, callbacks: list[Callback] | None) -> dict[str, float]:
    validate(cfg)
    check_memory(cfg)
    sweep = sweep_context()
    if sweep is not None:  # a sweep's runs share one W&B group, tagged with their swept values
        group, swept = sweep
        cfg.logger.group = cfg.logger.group or group
        cfg.logger.tags = [*cfg.logger.tags, *(f"{k}={v}"[:64] for k, v in swept.items())]
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
        *(callbacks or []),
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/mse", mode="min", save_last=True),
        CheckpointOnInterrupt(ckpt_dir / "interrupted.ckpt"),
        *requeue_callbacks(),  # after CheckpointOnInterrupt: requeue once the checkpoint is written
        ValidateAtEnd(),
        DivergenceGuard(),
    ]
    analysis = (
        AnalysisCallback(run_dir, cfg.eval.analysis_every, cfg.trainer.val_check_interval) if cfg.eval.analysis else None
    )
    if analysis is not None:
        callbacks.append(analysis)
    if cfg.trainer.enable_progress_bar:
        callbacks.append(StepProgressBar(cfg.trainer.max_steps))
    if len(loggers) > 1:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.append(RankWatchdog(run_dir))  # several ranks: SIGTERM ends them even when one is frozen
    t = cfg.trainer
    devices, strategy, claimed = sweep_job_devices(t)
    strategy = ddp_strategy(strategy, t.devices * t.num_nodes, t.ddp_timeout_s)  # collectives wait ddp_timeout_s
    with claimed:  # the GPUs this job holds in a parallel sweep, released however the run ends
        trainer = pl.Trainer(
            accelerator=t.accelerator,
            devices=devices,
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
    metrics["global_step"] = float(trainer.global_step)
    if analysis is not None and analysis.result is not None:
        metrics.update({f"analysis/{name}": value for name, value in analysis.result.scalars.items()})
    if trainer.is_global_zero:
        write_summary(run_dir, metrics)
    return metrics


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json in strict JSON: a non-finite number is null."""
    summary = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in summary.items()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
