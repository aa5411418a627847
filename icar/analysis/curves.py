"""The MSE-by-position curves of a model and its baselines, and what they say about the model against GD."""

from __future__ import annotations

import torch

from icar import metrics
from icar.objective import squared_error
from icar.training.module import ICARModule


def evaluate_curves(module: ICARModule, s: torch.Tensor, W: torch.Tensor,
                    batch_size: int = 256) -> dict[str, list[float]]:
    """Per-position MSE of the model and of every baseline on sequences s (n, T+1, d): what validation logs."""
    sums: dict[str, torch.Tensor] = {}
    device = next(module.parameters()).device
    with torch.no_grad():
        for i in range(0, len(s), batch_size):
            sb, Wb = s[i : i + batch_size].to(device), W[i : i + batch_size].to(device)
            pred, target = module.predict_sequences(sb)  # (b, T, d') each
            errors = {metrics.MODEL: squared_error(pred, target), **module.baseline_errors(sb, Wb)}  # (b, T) each
            for name, err in errors.items():
                sums[name] = sums.get(name, 0) + err.double().sum(0).cpu()
    return {name: (total / len(s)).tolist() for name, total in sums.items()}


def curve_summaries(curves: dict[str, list[float]], t0: int) -> dict[str, float]:
    """How the model compares with GD: its last-position MSE over one GD step's, and the most GD steps it matches at
    the last position and on the mean over positions t0.. (0-based)."""
    model = curves[metrics.MODEL]
    out: dict[str, float] = {}
    gd = sorted((k, c) for n, c in curves.items() if (k := metrics.gd_steps(n)) is not None)
    if gd:
        out[metrics.SUMMARY_MSE_LAST_OVER_GD1] = model[-1] / max(gd[0][1][-1], 1e-30)
        # the largest k whose GD is no better than the model (0: one GD step already beats it)
        out[metrics.SUMMARY_GD_STEPS_MATCHED_LAST] = float(max([k for k, c in gd if c[-1] >= model[-1]], default=0))
        mean = lambda c: sum(c[t0:]) / len(c[t0:])  # noqa: E731
        out[metrics.SUMMARY_GD_STEPS_MATCHED] = float(max([k for k, c in gd if mean(c) >= mean(model)], default=0))
    return out
