"""The run's own Lightning callbacks: progress against max_steps, a checkpoint when training stops on an exception
(also when another DDP rank is gone), and a final validation after the last step."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from icar.training.checkpoint_io import CheckpointError
from icar.training.ddp import is_collective_failure
from icar.training.guards import Diverged

log = logging.getLogger(__name__)


class StepProgressBar(TQDMProgressBar):
    """The streamed training set has no length: show progress against max_steps instead.

    A terminal redraws at most every `min_interval` seconds (a redraw every step of a 20 ms step cost 2-3% of it);
    a log file (CI, cluster jobs) gets about 50 updates per run."""

    min_interval = 0.25

    def __init__(self, max_steps: int) -> None:
        self.tty = sys.stdout.isatty()
        super().__init__(refresh_rate=1 if self.tty else max(1, max_steps // 50))
        self._drawn_at = -math.inf

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.monotonic()
        if self.tty and now - self._drawn_at < self.min_interval and trainer.global_step < trainer.max_steps:
            return
        self._drawn_at = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps * self.trainer.accumulate_grad_batches


class CheckpointOnInterrupt(Callback):
    """Save the state when training stops on an exception (Ctrl-C included), so that nothing is lost.

    The checkpoint is written as if taken at the end of the last completed step, the form Lightning resumes
    exactly; taken mid-batch as is, a resumed run's validation schedule and logging steps shift by one.
    (Lightning's OnExceptionCheckpoint has that shift, and its presence makes `fit(ckpt_path=None)` silently
    resume from any "last" checkpoint; here resuming stays explicit, `ckpt_path=...`.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saving = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0 or isinstance(exception, (Diverged, CheckpointError)):
            return  # nothing trained yet, non-finite weights, or the disk just refused a checkpoint
        self._saving = True
        try:
            if is_collective_failure(exception):  # another rank is gone: rank 0 saves alone, without a barrier
                if trainer.is_global_zero:  # private too: trainer.save_checkpoint would wait in a barrier for the dead
                    checkpoint = trainer._checkpoint_connector.dump_checkpoint()
                    trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.path)
                return
            trainer.save_checkpoint(self.path)
        except CheckpointError as err:  # keep the original exception: it says why the run stopped
            log.error(f"{err} (after: {type(exception).__name__}: {exception})")
        finally:
            self._saving = False

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Mark the interrupted step as the last one done. This writes Lightning's private loop state (the Lightning
        2.6 layout of `loops.fit_loop`, pinned in constraints-gpu.txt): Lightning has no public way to checkpoint
        between steps and resume at the next one. tests/test_train.py::test_interrupted_run_loses_nothing and
        tests/test_faults.py fail if a Lightning release changes that layout."""
        if not self._saving:
            return
        step = trainer.global_step  # optimiser steps done (no gradient accumulation here); one epoch only
        loop = checkpoint["loops"]["fit_loop"]
        for tracker in ("total", "current"):
            loop["epoch_loop.batch_progress"][tracker].update(
                ready=step, started=step, processed=step, completed=step - 1
            )
        loop["epoch_loop.state_dict"]["_batches_that_stepped"] = step - 1


class ValidateAtEnd(Callback):
    """Validate (hence checkpoint) after the last step even when max_steps is not a multiple of
    val_check_interval, so that last.ckpt and the returned metrics describe the final model."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True  # Lightning validates when asked to stop
