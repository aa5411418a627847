"""Run the analyses during and after training: figures and numbers in the run folder, mirrored to the loggers."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from icar import metrics
from icar.analysis.analyze import ANALYSIS_DIR, AnalysisResult, analyze
from icar.training.loggers import log_analysis
from icar.training.module import ICARModule



class AnalysisCallback(Callback):
    """Analyse the model at the end of training into RUN/analysis/ and, when `every` > 0, after every `every`-th
    validation into RUN/analysis/step_<global step>/. Rank 0 only; the analyses need no collective operation.

    The schedule is a function of the global step (validation number = step // val_check_interval), so a resumed
    run keeps it."""

    def __init__(self, run_dir: Path, every: int = 0, val_check_interval: int = 1) -> None:
        self.run_dir, self.every, self.val_check_interval = Path(run_dir), every, val_check_interval
        self.result: AnalysisResult | None = None

    def _analyse(self, trainer: pl.Trainer, module: pl.LightningModule, out_dir: Path, final: bool) -> None:
        if not trainer.is_global_zero:
            return
        if not isinstance(module, ICARModule):
            raise TypeError(f"AnalysisCallback analyses an ICARModule, got {type(module).__name__}")
        # validation hooks run under inference mode; the in-context map and the alignment need autograd
        with torch.inference_mode(False), torch.enable_grad():
            self.result = analyze(module, out_dir, module.val_curves or None)
        log_analysis(trainer.loggers, self.result.scalars, self.result.figures, trainer.global_step, summary=final)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or not self.every or step >= trainer.max_steps:
            return
        if (step // self.val_check_interval) % self.every == 0:
            self._analyse(trainer, pl_module, self.run_dir / ANALYSIS_DIR / f"step_{step}", final=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._analyse(trainer, pl_module, self.run_dir / ANALYSIS_DIR, final=True)

    def final_metrics(self) -> dict[str, float]:
        """The latest analysis numbers as `analysis/<name>`, for the run's summary (icar.training.run.ReportsMetrics)."""
        return {} if self.result is None else {metrics.analysis(k): v for k, v in self.result.scalars.items()}
