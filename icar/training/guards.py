"""What ends a run early, and how it ends: divergence (a non-finite loss), SIGTERM (exit 128 + 15 unless the run is
being requeued). The one-line failures and the record of a failed run are in icar/training/failures.py (no Lightning import)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from icar.training.failures import SIGTERM_EXIT, RunFailure
from icar.training.slurm import requeue_requested

__all__ = ["SIGTERM_EXIT", "RunFailure", "Diverged", "DivergenceGuard", "is_being_requeued", "finite_or_none"]


class Diverged(RunFailure):
    """The training loss became non-finite."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value
        super().__init__(
            f"diverged: train/loss = {value} at step {step}; lower optim.lr, set optim.grad_clip (e.g. 1.0)"
            " or add optim.warmup_steps"
        )


class DivergenceGuard(Callback):
    """Stop at the first non-finite training loss (every rank agrees, so none waits in a collective)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise Diverged(trainer.global_step, float(loss.detach().float().cpu()))


def is_being_requeued(run_dir: Path) -> bool:
    """True when this SLURM job is being requeued: after its requeue signal the run wrote its checkpoint and asked
    submitit to requeue it (`icar.training.slurm.RequeueOnSignal`), so the SIGTERM is expected and is not a failure."""
    return requeue_requested()


def finite_or_none(value: float) -> float | None:
    """Strict JSON has no NaN or Infinity: a non-finite number is recorded as null."""
    return value if math.isfinite(value) else None
