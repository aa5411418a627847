"""The few lines a finished run ends on: the model beside the baselines that matter, how many GD steps it is worth,
and where its files are (the run folder, the figures, the `wandb sync` command of an offline run)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from icar import metrics as names
from icar.metrics import ANALYSIS_DIR
from icar.metrics import GLOBAL_STEP, MODEL, MSE, MSE_LAST, OLS, ZERO, gd, val


def gd_steps_evaluated(metrics: Mapping[str, float], stat: str = MSE) -> list[int]:
    """The k of every `val/gd<k>/<stat>` among the metrics, in order."""
    parts = (name.split("/") for name in metrics)
    steps = (names.gd_steps(p[1]) for p in parts if len(p) == 3 and p[0] == "val" and p[2] == stat)
    return sorted(k for k in steps if k is not None)


def gd_steps_worth(metrics: Mapping[str, float], stat: str = MSE) -> tuple[int, int]:
    """(k, K): the most GD steps k <= K whose `val/gd<k>/<stat>` is no better than the model's (0: one GD step
    already beats the model), K the most steps evaluated."""
    steps = gd_steps_evaluated(metrics, stat)
    model = metrics.get(val(stat))
    if not steps or model is None:
        return 0, 0
    return max((k for k in steps if metrics[val(stat, gd(k))] >= model), default=0), steps[-1]


def _row(label: str, metrics: Mapping[str, float], of: str) -> str | None:
    mse, last = metrics.get(val(MSE, of)), metrics.get(val(MSE_LAST, of))
    if mse is None or last is None:
        return None
    return f"  {label:<28} {mse:>10.4g} {last:>12.4g}"


def _worth(metrics: Mapping[str, float]) -> str:
    counts = []
    for stat in (MSE, MSE_LAST):
        k, K = gd_steps_worth(metrics, stat)
        if K == 0:
            return "no GD baselines to compare with (eval.gd_steps=0)"
        counts.append(f"more than {K}" if k == K and metrics[val(stat, gd(K))] > metrics[val(stat)]
                      else f"{k}" if k else "less than 1")
    return (f"worth {counts[0]} GD steps on {val(MSE)}, {counts[1]} on {val(MSE_LAST)}"
            " (the most steps of tuned GD that it matches or beats)")


def closing_block(metrics: Mapping[str, float], run_dir: Path, n_layers: int, seconds: float | None = None) -> str:
    """The closing lines of a run from its final metrics and its folder (figures and W&B run as left on disk)."""
    run_dir = Path(run_dir)
    step = int(metrics.get(GLOBAL_STEP, 0))
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    lines = [f"finished {step} steps{took}: {run_dir}", f"  {'':<28} {val(MSE):>10} {val(MSE_LAST):>12}"]
    steps = gd_steps_evaluated(metrics)
    best = min(steps, key=lambda k: metrics[val(MSE, gd(k))], default=None)
    rows = [("model", MODEL), ("predict zero", ZERO)]  # then GD with as many steps as layers, the best GD, OLS
    if n_layers in steps:
        rows.append((f"GD, {n_layers} step{'s' if n_layers > 1 else ''} (= layers)", gd(n_layers)))
    if best is not None and best != n_layers:
        rows.append((f"best GD ({best} steps, of 1..{steps[-1]})", gd(best)))
    rows.append(("least squares (OLS)", OLS))
    lines += [r for r in (_row(label, metrics, of) for label, of in rows) if r is not None]
    lines.append(f"  {_worth(metrics)}")
    figures = sorted((run_dir / ANALYSIS_DIR).glob("*.png"))
    if figures:
        lines.append(f"  figures: {run_dir / ANALYSIS_DIR}/{{{','.join(p.stem for p in figures)}}}.png (and .pdf)")
    if list((run_dir / "wandb").glob("offline-run-*")):
        lines.append(f"  W&B offline; upload with: wandb sync {run_dir / 'wandb'}/offline-run-*")
    return "\n".join(lines)
