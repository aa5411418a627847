"""Aggregate a sweep (a Hydra multirun folder) from its run folders, offline: one table row per run (config values
and final metrics) and figures of the MSE against each swept value, GD and least squares overlaid.

A run folder is any folder below the sweep holding config.yaml and summary.json (what `icar.train.run` writes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from icar.analysis.plots import plt, save_figure

AGGREGATE_DIR = "aggregate"
IGNORED_KEYS = ("run_dir", "ckpt_path", "seed", "name")  # differ between runs without being a swept choice
IGNORED_PREFIXES = ("logger.", "trainer.enable_progress_bar")


def find_runs(sweep_dir: Path) -> list[Path]:
    """Run folders below sweep_dir (itself included), in path order."""
    sweep_dir = Path(sweep_dir)
    return sorted(p.parent for p in sweep_dir.rglob("summary.json") if (p.parent / "config.yaml").is_file())


def load_runs(sweep_dir: Path) -> pd.DataFrame:
    """One row per run: its flattened config (`model.n_layers`, `data.T`, ...), its final metrics (`val/mse_last`,
    `val/gd3/mse_last`, `analysis/...`) and `run_dir`."""
    rows = []
    for run in find_runs(sweep_dir):
        config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=False)
        row = pd.json_normalize(config, sep=".").iloc[0].to_dict()
        row.update(json.loads((run / "summary.json").read_text()))
        row["run_dir"] = str(run)
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no run folders (config.yaml + summary.json) below {sweep_dir}")
    return pd.DataFrame(rows)


def swept_keys(runs: pd.DataFrame) -> list[str]:
    """Config columns that take more than one value across the runs (the seed excepted: it is the spread)."""
    config_columns = [c for c in runs.columns if "." in c and "/" not in c]
    keys = [
        c for c in config_columns
        if c not in IGNORED_KEYS and not c.startswith(IGNORED_PREFIXES) and runs[c].astype(str).nunique() > 1
    ]
    return sorted(keys)


def plot_metric_against(runs: pd.DataFrame, x: str, path_stem: Path, metric: str = "val/mse_last",
                        hue: str | None = None) -> list[Path]:
    """`metric` against the swept value `x` (mean and standard deviation over seeds, one line per `hue` value), with
    least squares and GD overlaid; against the depth `model.n_layers`, GD takes as many steps as the model has layers
    (PAPER.md claim 4), elsewhere one step."""
    data = runs.sort_values(x)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.lineplot(data=data, x=x, y=metric, hue=hue, errorbar="sd", marker="o", ax=ax, label=None if hue else "model")
    suffix = metric.split("/")[-1]  # mse or mse_last
    by_x = data.groupby(x)
    if x == "model.n_layers":
        gd = [(L, data.loc[data[x] == L, f"val/gd{int(L)}/{suffix}"].mean()) for L in by_x.groups
              if f"val/gd{int(L)}/{suffix}" in data]
        if gd:
            ax.plot(*zip(*gd), "k--", marker="s", label="GD, L steps (tuned)")
    elif f"val/gd1/{suffix}" in data:
        ax.plot(list(by_x.groups), by_x[f"val/gd1/{suffix}"].mean().values, "k--", marker="s", label="GD, 1 step")
    ols = by_x[f"val/ols/{suffix}"].mean() if f"val/ols/{suffix}" in data else None
    if ols is not None and (ols > 1e-8).any():  # exact least squares (t > d) would only squash the axis
        ax.plot(list(by_x.groups), ols.clip(lower=1e-12).values, ":", color="tab:red", label="least squares")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def aggregate(sweep_dir: Path, metric: str = "val/mse_last") -> dict[str, list[Path]]:
    """Write SWEEP/aggregate/runs.csv and one figure per swept key; return {name: paths}."""
    runs = load_runs(sweep_dir)
    out = Path(sweep_dir) / AGGREGATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    keys = swept_keys(runs)
    hue = "model.attention" if "model.attention" in keys else None
    figures = {"runs.csv": [out / "runs.csv"]}
    for key in keys:
        if key == hue or not pd.api.types.is_numeric_dtype(runs[key]):
            continue
        name = f"{metric.replace('/', '_')}_vs_{key}"
        figures[name] = plot_metric_against(runs, key, out / name, metric, hue)
    return figures
