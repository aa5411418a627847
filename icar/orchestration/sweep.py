"""Aggregate a sweep (a Hydra multirun folder) from its run folders, offline: one table row per run (config values
and final metrics, icar.analysis.runs) and figures of the MSE against each swept value, GD and least squares
overlaid; the paper's figure for a figure sweep; the HTML report and the W&B aggregate run. The Hydra callback
`AggregateOnSweepEnd` does it when a sweep ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from icar import metrics
from icar.analysis.plots import plot_metric_against
from icar.analysis.runs import first_value, load_runs, swept_keys
from icar.analysis.sweep_curves import LEARNING_CURVES, MSE_BY_POSITION, plot_learning_curves, plot_mse_by_position
from icar.config import LoggerConfig, LoggerKind, WandbMode
from icar.orchestration.figures import AGGREGATE_DIR, make_figure
from icar.orchestration.job import sweep_group
from icar.orchestration.report import write_html_report
from icar.training.wandb_mode import wandb_mode

log = logging.getLogger(__name__)


def aggregate(sweep_dir: Path, metric: str = metrics.VAL_MSE_LAST) -> dict[str, list[Path]]:
    """Write SWEEP/aggregate/runs.csv, one figure per swept key, the learning curves and the MSE by position per
    configuration; return {name: paths}."""
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
    for name, plot in ((LEARNING_CURVES, plot_learning_curves), (MSE_BY_POSITION, plot_mse_by_position)):
        drawn = plot(runs, out / name)  # how the runs trained: one line per configuration, seeds as a band
        if drawn:
            figures[name] = drawn
    if "model.n_heads" in keys:  # head orthogonality (docs/PAPER_NOTES.md §3.5) against the number of heads
        for column in sorted(c for c in runs.columns if c.startswith(metrics.analysis(metrics.HEADS)) and c.endswith("_offdiag")):
            if runs[column].notna().any():
                name = f"{column.replace('/', '_')}_vs_model.n_heads"
                figures[name] = plot_metric_against(runs.dropna(subset=[column]), "model.n_heads", out / name,
                                                    column, hue, log_y=False)
    return figures


def log_aggregate_to_wandb(sweep_dir: Path, runs: pd.DataFrame, figures: dict[str, list[Path]],
                           numbers: dict[str, Any] | None = None) -> None:
    """The aggregate figures and table (and a figure's numbers, as summary values) as one W&B run (job type
    `aggregate`) in the sweep's group, beside its runs; online with a key, offline otherwise, like the runs."""
    import wandb  # imported only where a W&B run is made (seconds)

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
    sweep_dir = Path(sweep_dir)
    figures = aggregate(sweep_dir)
    numbers, figure_error = None, None
    if figure:
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
    figure sweep (`figure: fig3`, ...), the paper's figure and its record (icar.orchestration.figures). Hydra turns a
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
