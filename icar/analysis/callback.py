"""Run the analyses during and after training: figures and numbers in the run folder, mirrored to the loggers."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from icar.analysis.analyze import AnalysisResult, analyze
from icar.logging import log_analysis

ANALYSIS_DIR = "analysis"


class AnalysisCallback(Callback):
    """Analyse the model at the end of training into RUN/analysis/ and, when `every` > 0, after every `every`
    validations into RUN/analysis/step_<N>/. Rank 0 only; the analyses need no collective operation."""

    def __init__(self, run_dir: Path, every: int = 0) -> None:
        self.run_dir, self.every = Path(run_dir), every
        self.validations = 0
        self.result: AnalysisResult | None = None

    def _analyse(self, trainer: pl.Trainer, module: pl.LightningModule, out_dir: Path, final: bool) -> None:
        if not trainer.is_global_zero:
            return
        self.result = analyze(module, out_dir, module.val_curves or None)
        log_analysis(trainer.loggers, self.result.scalars, self.result.figures, trainer.global_step, summary=final)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.every:
            return
        self.validations += 1
        if self.validations % self.every == 0 and trainer.global_step < trainer.max_steps:
            self._analyse(trainer, pl_module, self.run_dir / ANALYSIS_DIR / f"step_{trainer.global_step}", final=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._analyse(trainer, pl_module, self.run_dir / ANALYSIS_DIR, final=True)
