"""Reports of a sweep: a W&B Report (panels over the sweep's runs, filtered to its group) and a local HTML page
(the aggregate figures, a table per swept configuration and one per run) that needs no W&B at all.

The W&B Report is built offline; only `publish_wandb_report` talks to the server.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from icar import metrics
from icar.analysis.runs import configurations
from icar.analysis.sweep_curves import LEARNING_CURVES, MSE_BY_POSITION, natural_order
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
    against each numeric swept key, a parallel-coordinates plot of all of them, the learning curves (`train/loss`,
    and `val/mse` with GD's and least squares' levels) grouped by configuration with the band over seeds, the runs'
    analysis images and the aggregate figures (logged as `aggregate/<name>` by a run of the same group: the paper's
    figure, the learning curves and the MSE by position per configuration, as in the HTML report).

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
    # learning curves, one line per configuration with the band over seeds (W&B groups by one key: the first swept
    # key but the seed), the GD levels as lines of their own (logged at every validation, so flat)
    group_key = next((k for k in swept if k != "seed" and k in runs), None)
    grouping = dict(groupby=wr.Config(group_key), groupby_aggfunc="mean", groupby_rangefunc="minmax") \
        if group_key else {}
    by = f" by {group_key}" if group_key else ""
    gd_levels = [m for m in (metrics.val(metrics.MSE, metrics.gd(1)), metrics.val(metrics.MSE, metrics.OLS))]
    panels.append(wr.LinePlot(title=f"{metrics.TRAIN_LOSS}{by}", x=metrics.WANDB_STEP, y=[metrics.TRAIN_LOSS],
                              log_y=True, **grouping))
    panels.append(wr.LinePlot(title=f"{metrics.VAL_MSE}{by}, GD 1 step and least squares as references",
                              x=metrics.WANDB_STEP, y=[metrics.VAL_MSE, *gd_levels], log_y=True, **grouping))
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


WIDE_PX = 1900  # a figure at least this wide (pixels at 150 dpi) spans the page: several panels side by side


def _png_tag(path: Path) -> str:
    raw = path.read_bytes()
    data = base64.b64encode(raw).decode("ascii")
    name = html.escape(path.name)
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")  # the PNG header's IHDR
    wide = ' class="wide"' if width >= WIDE_PX else ""
    return f'<figure{wide}><img src="data:image/png;base64,{data}" alt="{name}"><figcaption>{name}</figcaption></figure>'


def _with_gd_matched(runs: pd.DataFrame) -> pd.DataFrame:
    """`val/gdL/mse_last`: GD with as many steps as the run's model has layers (docs/PAPER_NOTES.md §4.4), where logged;
    a diagonal model (no `model.n_layers`) is one layer."""
    layers = runs["model.n_layers"].fillna(1) if "model.n_layers" in runs else pd.Series(1, index=runs.index)
    gd = [run.get(metrics.val(metrics.MSE_LAST, metrics.gd(L))) for (_, run), L in zip(runs.iterrows(), layers)]
    return runs.assign(**{GD_L: gd}) if any(pd.notna(v) for v in gd) else runs


def summary_table(runs: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """One row per configuration (its swept values but the seed: `configuration`, and the swept keys that are
    columns): the number of seeds, mean and standard deviation over seeds of `val/mse_last` and of the GD /
    least-squares baselines present."""
    runs = _with_gd_matched(runs.copy()).assign(configuration=configurations(runs).values)
    metric_names = [m for m in (METRIC, *BASELINES) if m in runs]
    keys = ["configuration", *[k for k in swept if k in runs and k != "seed"]]
    runs = runs.iloc[sorted(range(len(runs)), key=lambda i: natural_order(runs["configuration"].iloc[i]))]
    grouped = runs.groupby(keys, dropna=False, sort=False)
    table = (grouped["seed"].nunique() if "seed" in runs else grouped.size()).rename("seeds").to_frame()
    for m in metric_names:
        table[f"{m} mean"] = grouped[m].mean()
        table[f"{m} std"] = grouped[m].std()
    return table.reset_index()


SHORT = {METRIC: "model, last position", metrics.val(metrics.MSE_LAST, metrics.gd(1)): "GD, 1 step", GD_L: "GD, L steps",
         metrics.val(metrics.MSE_LAST, metrics.OLS): "least squares", metrics.VAL_MSE: "model, mean over positions"}


def _fmt(x: object) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}" if isinstance(x, float) else str(x)


def _cell(value: object, cls: str = "") -> str:
    return f'<td class="{cls}">{html.escape(_fmt(value))}</td>' if cls else f"<td>{html.escape(_fmt(value))}</td>"


def _summary_html(runs: pd.DataFrame, swept: list[str]) -> str:
    """The per-configuration table, narrow: one `mean ± std` cell per metric, short headers."""
    table = summary_table(runs, swept)
    metric_names = [m for m in (METRIC, *BASELINES) if f"{m} mean" in table]
    head = "".join(f'<th title="{html.escape(m)}, mean ± std over seeds">{html.escape(SHORT.get(m, m))}</th>'
                   for m in metric_names)
    rows = []
    for _, row in table.iterrows():
        cells = [_cell(row["configuration"], "key"), _cell(int(row["seeds"]))]
        for m in metric_names:
            mean, std = row[f"{m} mean"], row[f"{m} std"]
            text = _fmt(mean) if pd.isna(std) else f"{_fmt(mean)} ± {std:.2g}"
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<table id="summary"><caption>validation MSE at the last position, mean ± std over seeds</caption>'
            f"<thead><tr><th>configuration</th><th>seeds</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _run_links(run_dir: object, out: Path) -> tuple[str, str]:
    """(a link to the run's folder, links to its analysis figures), relative to the report's folder."""
    if not isinstance(run_dir, str) or not run_dir:
        return "-", "-"
    folder = Path(run_dir)
    rel = os.path.relpath(folder, out) if folder.is_absolute() else os.path.relpath(folder.absolute(), out.absolute())
    name = html.escape(folder.name)
    link = f'<a href="{html.escape(rel)}/">{name}</a>'
    pngs = sorted((folder / ANALYSIS_DIR).glob("*.png")) if folder.is_dir() else []
    figures = " ".join(f'<a href="{html.escape(rel)}/{ANALYSIS_DIR}/{html.escape(p.name)}">{html.escape(p.stem)}</a>'
                       for p in pngs)
    return link, figures or "-"


def _runs_html(runs: pd.DataFrame, swept: list[str], out: Path) -> str:
    """One row per run: its configuration and seed, the headline numbers, its folder and its analysis figures."""
    runs = runs.copy().assign(configuration=configurations(runs).values)
    metric_names = [m for m in RUN_METRICS if m in runs]
    order = [c for c in ("configuration", "seed") if c in runs]
    runs = runs.sort_values(order, key=lambda c: c.map(natural_order) if c.name == "configuration" else c)
    head = "".join(f'<th title="{html.escape(m)}">{html.escape(SHORT.get(m, m))}</th>' for m in metric_names)
    rows = []
    for _, run in runs.iterrows():
        link, figures = _run_links(run.get("run_dir"), out)
        cells = [_cell(run["configuration"], "key"), _cell(run.get("seed", "-"))]
        cells += [_cell(run.get(m)) for m in metric_names]
        steps = run.get(metrics.GLOBAL_STEP)
        cells += [_cell(int(steps) if pd.notna(steps) else None), f'<td class="key">{link}</td>',
                  f'<td class="key">{figures}</td>']
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<table id="runs"><thead><tr><th>configuration</th><th>seed</th>{head}<th>steps</th><th>run</th>'
            f"<th>analysis figures</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _section(title: str, paths: list[Path], note: str = "") -> str:
    if not paths:
        return ""
    return f"<h2>{html.escape(title)}</h2>{note}<div class=\"figures\">{''.join(_png_tag(p) for p in paths)}</div>"


def write_html_report(sweep_dir: Path, runs: pd.DataFrame, figures: list[Path], swept: list[str], title: str) -> Path:
    """Write SWEEP/aggregate/report.html: the paper's figure, how the runs trained (learning curves, MSE by
    position per configuration), the figures against the swept values, the per-configuration summary and the
    per-run table with links to each run's folder and analysis figures.

    The PNGs are embedded as base64 data URIs rather than linked, so the page is one file that still shows its
    figures when copied, mailed or uploaded alone; the runs' own analysis figures are linked (relative paths, valid
    inside the sweep folder). No external CSS or JS.
    """
    out = Path(sweep_dir) / AGGREGATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    training = {f"{n}.png" for n in (LEARNING_CURVES, MSE_BY_POSITION)}
    trained = [p for p in figures if p.name in training]
    against = [p for p in figures if p.name not in training and "_vs_" in p.stem]
    paper = [p for p in figures if p not in trained and p not in against]
    swept_text = ", ".join(swept) or "none"
    seeds = runs["seed"].nunique() if "seed" in runs else 1
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }}
.figures {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; flex: 1 1 460px; max-width: 580px; }}
figure.wide {{ flex-basis: 100%; max-width: 100%; }}
img {{ max-width: 100%; height: auto; }}
figcaption {{ font-size: 0.8em; color: #666; }}
.scroll {{ overflow-x: auto; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin-bottom: 1.5em; }}
caption {{ text-align: left; color: #666; padding-bottom: 0.3em; }}
th, td {{ border-bottom: 1px solid #e3e3e3; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }}
th {{ background: #f5f5f5; position: sticky; top: 0; }}
td.key, th:first-child {{ text-align: left; white-space: normal; }}
tbody tr:hover {{ background: #fafafa; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Sweep <code>{html.escape(str(sweep_dir))}</code>: {len(runs)} runs, {seeds} seed(s) per configuration; swept keys:
{html.escape(swept_text)}.</p>
{_section("The paper's figure", paper)}
{_section("How the runs trained", trained, "<p>One line per configuration: the mean over seeds, the band from the "
          "lowest to the highest seed; dashed, in the same colour, GD with as many steps as the model has layers.</p>")}
{_section("Against the swept values", against)}
{"" if figures else "<p>No figures.</p>"}
<h2>Summary by configuration</h2>
<div class="scroll">{_summary_html(runs, swept)}</div>
<h2>Runs</h2>
<div class="scroll">{_runs_html(runs, swept, out)}</div>
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

