"""Analyse one trained model: compute (icar.analysis.compute), draw (icar.analysis.draw), and save the numbers as
analysis.json. Used at the end of training (icar.analysis.callback) and offline from checkpoints (scripts/analyze.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icar.analysis.compute import Curves, ModelAnalysis, compute_analysis
from icar.analysis.curves import evaluate_curves
from icar.analysis.draw import draw_analysis
from icar.data.sequences import SequenceSampler
from icar.metrics import ANALYSIS_DIR, ANALYSIS_FILE, CURVES_TABLE, GD_STEP_SIZES_TABLE
from icar.training.module import ICARModule


@dataclass
class AnalysisResult:
    """A model's analysis and the figures drawn from it: what analysis.json records."""

    analysis: ModelAnalysis
    figures: dict[str, list[Path]]  # name -> [png, pdf]

    @property
    def scalars(self) -> dict[str, float]:
        return self.analysis.scalars

    def record(self) -> dict[str, Any]:
        """analysis.json: scalars, figures and, where the model has them, mse_by_position and gd_step_sizes."""
        tables = {CURVES_TABLE: self.analysis.mse_by_position, GD_STEP_SIZES_TABLE: self.analysis.gd_step_sizes}
        return {
            "scalars": self.scalars,
            "figures": {k: [str(p) for p in v] for k, v in self.figures.items()},
            **{k: v for k, v in tables.items() if v},
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.record(), indent=2, sort_keys=True, default=float) + "\n")


def analyze(module: ICARModule, out_dir: Path, curves: Curves | None = None) -> AnalysisResult:
    """Every analysis that applies to the module's model, its figures in out_dir and its numbers in
    out_dir/analysis.json; `curves` are the model's and baselines' MSE by position, when known."""
    analysis = compute_analysis(module, curves)
    result = AnalysisResult(analysis, draw_analysis(analysis, out_dir))
    result.save(out_dir / ANALYSIS_FILE)
    return result


def analyze_run_dir(run_dir: Path, checkpoint: str = "last", device: str = "cpu") -> AnalysisResult:
    """Recompute a finished run's analyses from RUN/checkpoints/<checkpoint>.ckpt into RUN/analysis/ (no W&B)."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
    if not ckpt.is_file():
        found = sorted(p.stem for p in (run_dir / "checkpoints").glob("*.ckpt"))
        raise FileNotFoundError(f"{ckpt} does not exist (checkpoints here: {found or 'none'}); is {run_dir} a run folder?")
    module = ICARModule.load_from_checkpoint(ckpt, map_location=device)
    module.tune_baselines()  # a no-op unless the checkpoint predates the saved step sizes
    data = module.cfg.data
    s, W = SequenceSampler(data).sample(data.val_size, torch.Generator().manual_seed(data.val_seed))  # the val set
    curves = evaluate_curves(module, s, W)
    return analyze(module, run_dir / ANALYSIS_DIR, curves)
