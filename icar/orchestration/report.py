"""Reports of a sweep: a W&B Report (panels over the sweep's runs, filtered to its group) and a local HTML page
(the aggregate figures, a table per swept configuration and one per run) that needs no W&B at all.

The W&B Report is built offline; only `publish_wandb_report` talks to the server.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from icar import metrics
from icar.metrics import ANALYSIS_DIR
from icar.orchestration.figures import AGGREGATE_DIR

if TYPE_CHECKING:
    import wandb_workspaces.reports.v2 as wr

METRIC = metrics.VAL_MSE_LAST
GD_L = metrics.val(metrics.MSE_LAST, "gdL")  # a report column: as many GD steps as the run has layers
BASELINES = (metrics.val(metrics.MSE_LAST, metrics.gd(1)), GD_L, metrics.val(metrics.MSE_LAST, metrics.OLS))
RUN_METRICS = (metrics.VAL_MSE, METRIC, metrics.val(metrics.MSE_LAST, metrics.gd(1)),
               metrics.val(metrics.MSE_LAST, metrics.OLS))
ANALYSIS_FIGURES = ("mse_by_position", "head_orthogonality", "positional", "c_structure")  # icar.analysis.analyze
REPORT_FILE = "report.html"
TITLE_MAX = 128  # wandb-workspaces refuses longer report titles


def group_filter(group: str) -> str:
    """A wandb-workspaces filter expression selecting the runs of W&B group `group`.

    The expression is parsed with Python's `ast` after wandb-workspaces rewrites `=` to `==`, `<` to `<=` and `>` to
    `>=` everywhere in the string, string literals included; writing those characters as `\\x3d`, `\\x3c`, `\\x3e`
    escapes keeps a group name such as `lr=0.1` intact.
    """
    literal = repr(group).replace("=", "\\x3d").replace("<", "\\x3c").replace(">", "\\x3e")
    return f"Metric('Group') == {literal}"


def analysis_media_keys(runs: pd.DataFrame) -> list[str]:
    """`analysis/<figure>` keys of the images the runs log: the PNGs in their RUN/analysis/ folders, else the figures
    `icar.analysis.analyze` draws."""
    names = {p.stem for run_dir in runs.get("run_dir", pd.Series(dtype=str)).dropna()
             for p in (Path(str(run_dir)) / ANALYSIS_DIR).glob("*.png")}
    return [metrics.analysis(name) for name in sorted(names or ANALYSIS_FIGURES)]


def build_wandb_report(runs: pd.DataFrame, figure_names: list[str], swept: list[str], project: str,
                       entity: str | None, group: str, title: str) -> "wr.Report":
    """A W&B Report over the runs of `group`: an intro naming the sweep, then one panel grid holding `val/mse_last`
    against each numeric swept key, a parallel-coordinates plot of all of them, `val/mse` over training, the
    runs' analysis images and the aggregate figures (logged as `aggregate/<name>` by a run of the same group).

    Offline: without an entity the report's entity stays empty (wandb-workspaces would ask the server for the
    default one); `publish_wandb_report` fills it in.
    """
    import wandb_workspaces.reports.v2 as wr

    numeric = [k for k in swept if k in runs and pd.api.types.is_numeric_dtype(runs[k])]
    panels: list = [
        wr.ScatterPlot(title=f"{METRIC} vs {key}", x=wr.Config(key), y=wr.SummaryMetric(METRIC), log_y=True)
        for key in numeric
    ]
    if swept:
        columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in swept]
        columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(METRIC), log=True))
        panels.append(wr.ParallelCoordinatesPlot(title=f"{METRIC} across the swept values", columns=columns))
    panels.append(wr.LinePlot(title=metrics.VAL_MSE, x=metrics.WANDB_STEP, y=[metrics.VAL_MSE], log_y=True))
    panels.append(wr.MediaBrowser(title="analysis figures", media_keys=analysis_media_keys(runs), num_columns=2))
    if figure_names:
        panels.append(wr.MediaBrowser(title="sweep aggregate", media_keys=[f"aggregate/{n}" for n in figure_names],
                                      num_columns=2))
    runset = wr.Runset(entity=entity or "", project=project, name=group, filters=group_filter(group))
    seeds = runs["seed"].nunique() if "seed" in runs else 1
    intro = (f"Sweep `{group}`: {len(runs)} runs ({seeds} seeds per configuration), swept keys: "
             + (", ".join(f"`{k}`" for k in swept) or "none") + f". Headline metric: `{METRIC}`.")
    return wr.Report(
        project=project,
        entity=entity or "",
        title=title[:TITLE_MAX],
        description=f"Sweep {group}",
        blocks=[wr.MarkdownBlock(text=intro), wr.PanelGrid(runsets=[runset], panels=panels)],
    )


def publish_wandb_report(report: "wr.Report") -> str:
    """Save the report to W&B (online, an API key needed) and return its URL; an empty entity becomes the API key's
    default entity."""
    import wandb
    import wandb_workspaces.reports.v2 as wr

    if not report.entity:
        report.entity = wandb.Api().default_entity
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            for runset in block.runsets:
                runset.entity = runset.entity or report.entity
    report.save()
    return report.url


def _png_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{name}"><figcaption>{name}</figcaption></figure>'


def _with_gd_matched(runs: pd.DataFrame) -> pd.DataFrame:
    """`val/gdL/mse_last`: GD with as many steps as the run's model has layers (docs/PAPER_NOTES.md §4.4), where logged;
    a diagonal model (no `model.n_layers`) is one layer."""
    layers = runs["model.n_layers"].fillna(1) if "model.n_layers" in runs else pd.Series(1, index=runs.index)
    gd = [run.get(metrics.val(metrics.MSE_LAST, metrics.gd(L))) for (_, run), L in zip(runs.iterrows(), layers)]
    return runs.assign(**{GD_L: gd}) if any(pd.notna(v) for v in gd) else runs


def summary_table(runs: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """One row per swept configuration: the number of seeds, mean and standard deviation over seeds of
    `val/mse_last` and of the GD / least-squares baselines present."""
    runs = _with_gd_matched(runs)
    metrics = [m for m in (METRIC, *BASELINES) if m in runs]
    keys = [k for k in swept if k in runs]
    if not keys:
        runs, keys = runs.assign(configuration="all"), ["configuration"]
    grouped = runs.groupby(keys, dropna=False)
    table = (grouped["seed"].nunique() if "seed" in runs else grouped.size()).rename("seeds").to_frame()
    for m in metrics:
        table[f"{m} mean"] = grouped[m].mean()
        table[f"{m} std"] = grouped[m].std()
    return table.reset_index()


def write_html_report(sweep_dir: Path, runs: pd.DataFrame, figures: list[Path], swept: list[str], title: str) -> Path:
    """Write SWEEP/aggregate/report.html: the figures, the per-configuration summary and the per-run table.

    The PNGs are embedded as base64 data URIs rather than linked, so the page is one file that still shows its
    figures when copied, mailed or uploaded alone (a sweep's figures are a few small PNGs). No external CSS or JS.
    """
    out = Path(sweep_dir) / AGGREGATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    fmt = "{:.4g}".format
    columns = [c for c in (*swept, "seed", *RUN_METRICS, "run_dir") if c in runs]
    sort = [c for c in (*swept, "seed") if c in runs]
    per_run = runs[columns].sort_values(sort) if sort else runs[columns]
    summary = summary_table(runs, swept).to_html(index=False, float_format=fmt, na_rep="-", border=0,
                                                 table_id="summary")
    runs_html = per_run.to_html(index=False, float_format=fmt, na_rep="-", border=0, table_id="runs")
    swept_text = ", ".join(swept) or "none"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
img {{ max-width: 640px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Sweep <code>{html.escape(str(sweep_dir))}</code>: {len(runs)} runs; swept keys: {html.escape(swept_text)}.</p>
<h2>Figures</h2>
{"".join(_png_tag(p) for p in figures) or "<p>No figures.</p>"}
<h2>Summary (mean and standard deviation over seeds)</h2>
{summary}
<h2>Runs</h2>
{runs_html}
</body></html>
"""
    path = out / REPORT_FILE
    path.write_text(page)
    return path


def report_summary(report: "wr.Report") -> str:
    """One line: the report's blocks, its panels by type and each runset's project and filter."""
    import wandb_workspaces.reports.v2 as wr

    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    panels = [type(p).__name__ for g in grids for p in g.panels]
    kinds = ", ".join(f"{n} {k}" for k, n in Counter(panels).items())
    runsets = "; ".join(f"{r.entity or '<default entity>'}/{r.project} where {r.filters}"
                        for g in grids for r in g.runsets)
    return f"{len(report.blocks)} blocks, {len(panels)} panels ({kinds}); runs: {runsets}"

