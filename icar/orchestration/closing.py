"""The few lines a finished run ends on: the model beside the baselines that matter, how many GD steps it is worth,
and where its files are (the run folder, the figures, the `wandb sync` command of an offline run)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping


def gd_steps_worth(metrics: Mapping[str, float], metric: str = "mse") -> tuple[int, int]:
    """(k, K): the most GD steps k <= K whose `val/gd<k>/<metric>` is no better than the model's (0: one GD step
    already beats the model), K the most steps evaluated."""
    steps = sorted(int(name.split("/")[1][2:]) for name in metrics
                   if name.startswith("val/gd") and name.endswith(f"/{metric}") and name.split("/")[1][2:].isdigit())
    model = metrics.get(f"val/{metric}")
    if not steps or model is None:
        return 0, 0
    return max((k for k in steps if metrics[f"val/gd{k}/{metric}"] >= model), default=0), steps[-1]


def _row(label: str, metrics: Mapping[str, float], prefix: str) -> str | None:
    mse, last = metrics.get(f"{prefix}/mse"), metrics.get(f"{prefix}/mse_last")
    if mse is None or last is None:
        return None
    return f"  {label:<28} {mse:>10.4g} {last:>12.4g}"


def _worth(metrics: Mapping[str, float]) -> str:
    counts = []
    for metric in ("mse", "mse_last"):
        k, K = gd_steps_worth(metrics, metric)
        if K == 0:
            return "no GD baselines to compare with (eval.gd_steps=0)"
        counts.append(f"more than {K}" if k == K and metrics[f"val/gd{K}/{metric}"] > metrics[f"val/{metric}"]
                      else f"{k}" if k else "less than 1")
    return (f"worth {counts[0]} GD steps on val/mse, {counts[1]} on val/mse_last"
            " (the most steps of tuned GD that it matches or beats)")


def closing_block(metrics: Mapping[str, float], run_dir: Path, n_layers: int, seconds: float | None = None) -> str:
    """The closing lines of a run from its final metrics and its folder (figures and W&B run as left on disk)."""
    run_dir = Path(run_dir)
    step = int(metrics.get("global_step", 0))
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    lines = [f"finished {step} steps{took}: {run_dir}", f"  {'':<28} {'val/mse':>10} {'val/mse_last':>12}"]
    gd = sorted(int(n.split("/")[1][2:]) for n in metrics
                if n.startswith("val/gd") and n.endswith("/mse") and n.split("/")[1][2:].isdigit())
    best = min(gd, key=lambda k: metrics[f"val/gd{k}/mse"], default=None)
    rows = [("model", "val"), ("predict zero", "val/zero")]  # then GD with as many steps as layers, the best GD, OLS
    if n_layers in gd:
        rows.append((f"GD, {n_layers} step{'s' if n_layers > 1 else ''} (= layers)", f"val/gd{n_layers}"))
    if best is not None and best != n_layers:
        rows.append((f"best GD ({best} steps, of 1..{gd[-1]})", f"val/gd{best}"))
    rows.append(("least squares (OLS)", "val/ols"))
    lines += [r for r in (_row(label, metrics, prefix) for label, prefix in rows) if r is not None]
    lines.append(f"  {_worth(metrics)}")
    figures = sorted((run_dir / "analysis").glob("*.png"))
    if figures:
        lines.append(f"  figures: {run_dir / 'analysis'}/{{{','.join(p.stem for p in figures)}}}.png (and .pdf)")
    if list((run_dir / "wandb").glob("offline-run-*")):
        lines.append(f"  W&B offline; upload with: wandb sync {run_dir / 'wandb'}/offline-run-*")
    return "\n".join(lines)
