"""Aggregate a sweep (a Hydra multirun folder) from its run folders, offline: one table row per run (config values
and final metrics) and figures of the MSE against each swept value, GD and least squares overlaid.

A run folder is any folder below the sweep holding config.yaml and summary.json (what `icar.train.run` writes) and
no failure.txt (a diverged run writes a summary too).
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from hydra.experimental.callback import Callback
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig, OmegaConf

from icar.analysis.plots import plt, save_figure
from icar.failures import FAILURE_FILE

log = logging.getLogger(__name__)
AGGREGATE_DIR = "aggregate"
IGNORED_KEYS = ("run_dir", "ckpt_path", "seed", "name")  # differ between runs without being a swept choice
IGNORED_PREFIXES = ("logger.", "trainer.enable_progress_bar")


def first_value(runs: pd.DataFrame, column: str) -> str | None:
    """The most common non-empty value of `column` across the runs (e.g. their `logger.group`), or None."""
    values = runs[column].dropna().astype(str).str.strip() if column in runs else pd.Series(dtype=str)
    values = values[values != ""]
    return values.mode().iloc[0] if len(values) else None


def find_runs(sweep_dir: Path) -> list[Path]:
    """Finished run folders below sweep_dir (itself included), in path order: a diverged or otherwise failed run
    (failure.txt) is left out; icar.analysis.jobs says which are missing and why."""
    sweep_dir = Path(sweep_dir)
    return sorted(p.parent for p in sweep_dir.rglob("summary.json")
                  if (p.parent / "config.yaml").is_file() and not (p.parent / FAILURE_FILE).exists())


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


def swept_values(tags: Any) -> dict[str, str]:
    """{key: value} of a run's `key=value` W&B tags (what its sweep swept, icar.logging.sweep_context); `tags` is the
    run's `logger.tags` as loaded from config.yaml (a list) or read back from runs.csv (its string)."""
    if isinstance(tags, str):
        try:
            tags = ast.literal_eval(tags)
        except (ValueError, SyntaxError):
            return {}
    if not isinstance(tags, (list, tuple, np.ndarray)):
        return {}
    return dict(str(t).split("=", 1) for t in tags if "=" in str(t))


def _tagged_keys(runs: pd.DataFrame) -> set[str]:
    """The keys the runs carry as swept `key=value` tags."""
    return {k for tags in (runs["logger.tags"] if "logger.tags" in runs else []) for k in swept_values(tags)}


def swept_keys(runs: pd.DataFrame) -> list[str]:
    """Config columns that take more than one value across the runs (the seed excepted: it is the spread). When the
    runs carry their swept values as tags, only those keys: a sweep over `experiment=a,b` changes many keys at once,
    and plotting against each of them would only mislead."""
    config_columns = [c for c in runs.columns if "." in c and "/" not in c]
    keys = [
        c for c in config_columns
        if c not in IGNORED_KEYS and not c.startswith(IGNORED_PREFIXES) and runs[c].astype(str).nunique() > 1
    ]
    tagged = _tagged_keys(runs)
    return sorted(k for k in keys if not tagged or k in tagged)


def plot_metric_against(runs: pd.DataFrame, x: str, path_stem: Path, metric: str = "val/mse_last",
                        hue: str | None = None, log_y: bool = True) -> list[Path]:
    """`metric` against the swept value `x` (mean over seeds, band from min to max, one line per `hue` value), with
    least squares and GD overlaid; against the depth `model.n_layers`, GD takes as many steps as the model has layers
    (docs/PAPER_NOTES.md §4.4), elsewhere one step."""
    data = runs.sort_values(x)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.lineplot(data=data, x=x, y=metric, hue=hue, errorbar=("pi", 100), marker="o", ax=ax, **({} if hue else {"label": "model"}))
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
    if log_y:
        ax.set_yscale("log")
    values = sorted(data[x].unique())
    if values[0] > 0 and values[-1] / values[0] >= 16:  # H = 1..64, T = 10..100: evenly spaced on a log axis
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    if ax.get_legend_handles_labels()[0]:
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
    if "model.n_heads" in keys:  # head orthogonality (docs/PAPER_NOTES.md §3.5) against the number of heads
        for column in sorted(c for c in runs.columns if c.startswith("analysis/heads/") and c.endswith("_offdiag")):
            if runs[column].notna().any():
                name = f"{column.replace('/', '_')}_vs_model.n_heads"
                figures[name] = plot_metric_against(runs.dropna(subset=[column]), "model.n_heads", out / name,
                                                    column, hue, log_y=False)
    return figures


def log_aggregate_to_wandb(sweep_dir: Path, runs: pd.DataFrame, figures: dict[str, list[Path]],
                           numbers: dict[str, Any] | None = None) -> None:
    """The aggregate figures and table (and a figure's numbers, as summary values) as one W&B run (job type
    `aggregate`) in the sweep's group, beside its runs; online with a key, offline otherwise, like the runs."""
    import wandb

    from icar.config import LoggerConfig, LoggerKind, WandbMode
    from icar.logging import sweep_group, wandb_mode

    if first_value(runs, "logger.kind") not in (None, LoggerKind.wandb.value):
        return
    logger_cfg = LoggerConfig(project=first_value(runs, "logger.project") or "icar", entity=first_value(runs, "logger.entity"),
                              mode=WandbMode(first_value(runs, "logger.mode") or "auto"))
    group = first_value(runs, "logger.group") or sweep_group(sweep_dir)
    out = Path(sweep_dir) / AGGREGATE_DIR
    run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity, group=group, job_type="aggregate",
                     name=f"{group}/aggregate", dir=str(out), reinit="create_new",
                     settings=wandb.Settings(mode=wandb_mode(logger_cfg), silent=True, init_timeout=60))
    try:
        images = {f"aggregate/{name}": wandb.Image(str(p)) for name, paths in figures.items()
                  for p in paths if p.suffix == ".png"}
        table = runs[[c for c in runs.columns if pd.api.types.is_numeric_dtype(runs[c]) or c.startswith("model.")]]
        run.log({**images, "aggregate/runs": wandb.Table(dataframe=table)})
        if numbers:
            run.summary.update({k: v for k, v in numbers.items() if isinstance(v, (int, float, str))})
    finally:
        run.finish()


def finish_sweep(sweep_dir: Path, title: str, log_to_wandb: bool = True, figure: str | None = None) -> Path:
    """Aggregate the run folders (aggregate/runs.csv and figures), draw the paper's `figure` when given (with its
    record aggregate/figure.json), write aggregate/report.html and log the figures to W&B in the sweep's group;
    return the report's path."""
    from icar.analysis.report import write_html_report

    sweep_dir = Path(sweep_dir)
    figures = aggregate(sweep_dir)
    numbers, figure_error = None, None
    if figure:
        from icar.analysis.figures import make_figure

        try:
            record = make_figure(figure, sweep_dir)
        except Exception as err:  # the table, report and W&B aggregate are still written; raised at the end
            figure_error = err
            log.exception(f"drawing {figure} from {sweep_dir} failed")
        else:
            drawn: dict[str, list[Path]] = {}
            for path in map(Path, record.figures):  # stem.png and stem.pdf under one name
                drawn.setdefault(f"{figure}/{path.stem}", []).append(path)
            figures = {**drawn, **figures}
            numbers = {f"{figure}/{k}": v for k, v in record.numbers.items()}
            log.info(f"{figure}: {sweep_dir / AGGREGATE_DIR / 'figure.json'}")
    runs = pd.read_csv(sweep_dir / AGGREGATE_DIR / "runs.csv")
    pngs = [p for paths in figures.values() for p in paths if p.suffix == ".png"]
    report = write_html_report(sweep_dir, runs, pngs, swept_keys(runs), title)
    if log_to_wandb:
        log_aggregate_to_wandb(sweep_dir, runs, figures, numbers)
    log.info(f"aggregate of {len(runs)} runs: {sweep_dir / AGGREGATE_DIR / 'runs.csv'}, {len(pngs)} figures, "
             f"{report}")
    if figure_error is not None:
        raise figure_error
    return report


class AggregateOnSweepEnd(Callback):
    """Hydra callback of the sweep configs (`sweeps/*.yaml`): `finish_sweep` once every job has ended, then, for a
    figure sweep (`figure: fig3`, ...), the paper's figure and its record (icar.analysis.figures). Hydra turns a
    callback's exception into a warning, so a failure is logged with the command that redoes it and ends the process
    with exit status 1 (SystemExit passes through Hydra), so that `make fig3` fails rather than succeeding silently."""

    def __init__(self, figure: str | None = None) -> None:
        self.figure = figure

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        redo = f"python scripts/analyze.py {sweep_dir} && python scripts/report.py {sweep_dir}"
        if self.figure:
            redo += f" && python scripts/reproduction.py --figure {self.figure} {sweep_dir}"
        try:
            finish_sweep(sweep_dir, f"icar sweep {config.name}", figure=self.figure)
        except Exception as err:
            log.exception(f"aggregating {sweep_dir} failed; redo it with: {redo}")
            raise SystemExit(f"aggregating {sweep_dir} failed ({type(err).__name__}: {err}); redo it with: {redo}")
