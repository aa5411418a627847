"""Sweep reports from a made-up runs table (nothing trained): the W&B Report object offline and the HTML page."""

from __future__ import annotations

import base64
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from icar.analysis.plots import plt
from icar.orchestration.report import build_wandb_report, group_filter, summary_table, write_html_report
from icar.analysis.runs import swept_keys
from tests.conftest import REPO

GROUP = "augmented_depth/2024-05-01_12-00-00"


def make_runs(run_dir_prefix: str = "multirun/x") -> pd.DataFrame:
    """2 attentions x 2 depths x 2 seeds, plausible MSEs (deeper is better, softmax a little worse)."""
    rows = []
    for attention in ("linear", "softmax"):
        for n_layers in (1, 2):
            for seed in (0, 1):
                mse = 0.5 / n_layers * (1.3 if attention == "softmax" else 1.0) + 0.01 * seed
                rows.append({
                    "model.attention": attention, "model.n_layers": n_layers, "data.T": 50, "seed": seed,
                    "logger.project": "icar", "logger.group": GROUP,
                    "val/mse": mse * 1.2, "val/mse_last": mse, "val/gd1/mse_last": 0.6, "val/gd2/mse_last": 0.3,
                    "val/ols/mse_last": 0.0, "run_dir": f"{run_dir_prefix}/{attention}_{n_layers}_{seed}",
                })
    return pd.DataFrame(rows)


def make_figures(aggregate: Path) -> list[Path]:
    aggregate.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("val_mse_last_vs_model.n_layers", "val_mse_by_position"):
        fig, ax = plt.subplots(figsize=(1, 1))
        ax.plot([0, 1], [1, 0])
        fig.savefig(aggregate / f"{name}.png", dpi=20)
        plt.close(fig)
        paths.append(aggregate / f"{name}.png")
    return paths


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")


def test_wandb_report_is_built_offline(offline):
    """Title, panels by type, the runset's project/entity, and a filter that selects exactly the sweep's group."""
    from wandb_workspaces import expr
    import wandb_workspaces.reports.v2 as wr

    runs = make_runs()
    swept = swept_keys(runs)
    assert swept == ["model.attention", "model.n_layers"]
    report = build_wandb_report(runs, ["val_mse_last_vs_model.n_layers"], swept, "icar", "me", GROUP, "My sweep")
    assert report.title == "My sweep" and report.project == "icar" and report.entity == "me"
    intro, grid = report.blocks
    assert isinstance(intro, wr.MarkdownBlock) and GROUP in intro.text and "model.n_layers" in intro.text
    assert isinstance(grid, wr.PanelGrid)
    types = [type(p).__name__ for p in grid.panels]
    assert types == ["ScatterPlot", "ParallelCoordinatesPlot", "LinePlot", "LinePlot", "MediaBrowser", "MediaBrowser"]
    scatter, _, loss, line, analysis, agg = grid.panels
    assert scatter.x == wr.Config("model.n_layers") and scatter.y == wr.SummaryMetric("val/mse_last")
    assert loss.y == ["train/loss"] and line.x == "trainer/global_step"
    assert line.y == ["val/mse", "val/gd1/mse", "val/ols/mse"]  # GD's and least squares' levels beside the model
    for curve in (loss, line):  # one line per configuration, the band over seeds
        assert curve.groupby == wr.Config("model.attention") and curve.groupby_rangefunc == "minmax"
    assert "analysis/head_orthogonality" in analysis.media_keys
    assert agg.media_keys == ["aggregate/val_mse_last_vs_model.n_layers"]

    (runset,) = grid.runsets
    assert (runset.entity, runset.project) == ("me", "icar")
    tree = expr.expr_to_filters(runset.filters)  # what Runset._to_model sends, parsed offline
    assert (tree.key.section, tree.key.name, tree.op, tree.value) == ("run", "group", "=", GROUP)

    # No entity: nothing asks the server for one, and the whole spec serialises offline (the runset then carries no
    # project lookup, which is the only server call in building the spec).
    report = build_wandb_report(runs, [], swept, "icar", None, GROUP, "x" * 300)
    assert report.entity == "" and len(report.title) == 128
    spec = report._to_model().model_dump(by_alias=True, exclude_none=True)
    grid_spec = next(b for b in spec["spec"]["blocks"] if b["type"] == "panel-grid")
    (runset_spec,) = grid_spec["metadata"]["runSets"]
    assert runset_spec["filters"]["filters"] == [
        {"key": {"section": "run", "name": "group"}, "op": "=", "value": GROUP, "disabled": False}]
    assert len(grid_spec["metadata"]["panelBankSectionConfig"]["panels"]) == 5  # no aggregate figures this time


@pytest.mark.parametrize("group", ["lr=0.1,n<3", "it's \"quoted\"", "a\\=b>c", GROUP])
def test_group_filter_survives_operator_rewriting(group):
    """wandb-workspaces rewrites = < > inside the expression string; the group name must come back unchanged."""
    from wandb_workspaces import expr

    assert expr.expr_to_filters(group_filter(group)).value == group


def _table_rows(page: str, table_id: str) -> list[list[str]]:
    table = re.search(rf'<table[^>]*id="{table_id}".*?</table>', page, re.S).group(0)
    rows = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S) for row in re.findall(r"<tr.*?</tr>", table, re.S)]
    return [[cell.strip() for cell in row] for row in rows]


def test_html_report(tmp_path):
    """The page holds every figure, one summary row per configuration with its mean over seeds, and escapes HTML."""
    runs = make_runs(run_dir_prefix="<script>alert(1)</script>")
    figures = make_figures(tmp_path / "aggregate")
    swept = swept_keys(runs)
    path = write_html_report(tmp_path, runs, figures, swept, "Sweep <b>depth</b>")
    assert path == tmp_path / "aggregate" / "report.html"
    page = path.read_text()
    for fig in figures:
        assert fig.name in page and base64.b64encode(fig.read_bytes()).decode() in page
    assert "<script>" not in page and html.escape("<script>alert(1)</script>", quote=False) in page
    assert "<b>depth</b>" not in page and "Sweep &lt;b&gt;depth&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere

    header, *rows = _table_rows(page, "summary")
    assert header == ["configuration", "seeds", "model, last position", "GD, 1 step", "GD, L steps", "least squares"]
    expected = runs.groupby(swept)["val/mse_last"].agg(["mean", "std"])
    assert len(rows) == len(expected) == 4
    for row in rows:  # "n_layers=2, attention=softmax" (from the swept keys: these runs carry no tags)
        values = dict(part.split("=") for part in row[0].split(", "))
        mean, std = (float(x) for x in row[2].split(" ± "))
        assert row[1] == "2" and np.isclose(mean, expected.loc[(values["attention"], int(values["n_layers"])), "mean"],
                                            rtol=1e-3)
        assert np.isclose(std, expected.loc[(values["attention"], int(values["n_layers"])), "std"], rtol=0.05)
    table = summary_table(runs, swept)
    assert list(table.loc[table["model.n_layers"] == 2, "val/gdL/mse_last mean"]) == [0.3, 0.3]

    header, *rows = _table_rows(page, "runs")
    assert len(rows) == 8 and header[-2:] == ["run", "analysis figures"] and "GD, 1 step" in header


def test_html_report_links_each_runs_folder_and_analysis_figures(tmp_path):
    runs = make_runs(run_dir_prefix=str(tmp_path / "sweep"))
    for run_dir in runs["run_dir"]:
        (Path(run_dir) / "analysis").mkdir(parents=True)
        (Path(run_dir) / "analysis" / "mse_by_position.png").write_bytes(b"png")
    page = write_html_report(tmp_path / "sweep", runs, [], swept_keys(runs), "t").read_text()
    for run_dir in runs["run_dir"]:
        name = Path(run_dir).name
        assert f'href="../{name}/"' in page and f'href="../{name}/analysis/mse_by_position.png"' in page


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.Popen([sys.executable, "scripts/report.py", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_report_script(tmp_path):
    """On a folder holding only aggregate/runs.csv and PNGs: exit 0, report.html written, nothing published; on an
    empty folder: a one-line error. Both run at once (each start imports torch)."""
    sweep = tmp_path / "sweep"
    make_figures(sweep / "aggregate")
    make_runs().to_csv(sweep / "aggregate" / "runs.csv", index=False)
    (tmp_path / "empty").mkdir()
    full, empty = _start(str(sweep), "--publish"), _start(str(tmp_path / "empty"))
    (out, err), (_, empty_err) = full.communicate(timeout=120), empty.communicate(timeout=120)

    assert full.returncode == 0, err[-3000:]
    assert (sweep / "aggregate" / "report.html").stat().st_size > 0
    assert f"Metric('Group') == '{GROUP}'" in out and "6 panels" in out
    assert "not published (WANDB_MODE=offline)" in out

    assert empty.returncode != 0 and "Traceback" not in empty_err
    assert len(empty_err.strip().splitlines()) == 1 and "no run folders" in empty_err


def test_curve_frames_read_each_runs_record_and_pick_the_gd_level_of_its_loss(tmp_path):
    """Learning curves and MSE by position per configuration come from metrics.jsonl; the dashed GD level is GD with
    as many steps as layers, at the last position for a training loss on the last position (Proposition 2)."""
    import json

    from icar.analysis.sweep_curves import curve_frames, plot_learning_curves, plot_mse_by_position

    rows = []
    for n_layers in (1, 2):
        for seed in (0, 1):
            run_dir = tmp_path / f"L{n_layers}_s{seed}"
            run_dir.mkdir()
            records = [{"step": s, "train/loss": 1.0 / (s + 1) + seed} for s in range(5)]
            records.append({"step": 4, "val/mse": 0.5, "val/mse_by_pos": [1.0, 0.5, 0.25],
                            f"val/gd{n_layers}/mse_by_pos": [1.0, 0.6, 0.4], "val/gd1/mse_by_pos": [9, 9, 9]})
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            rows.append({"model.n_layers": n_layers, "seed": seed, "loss_on": "last", "run_dir": str(run_dir),
                         f"val/gd{n_layers}/mse": 0.3 * n_layers + seed, f"val/gd{n_layers}/mse_last": 0.1 * n_layers})
    runs = pd.DataFrame(rows)
    curves, by_position, levels = curve_frames(runs)
    assert set(curves["configuration"]) == {"n_layers=1", "n_layers=2"} and len(curves) == 4 * 6
    assert levels["n_layers=2"] == {"val/mse": pytest.approx(1.1), "train/loss": pytest.approx(0.2)}
    gd = by_position[(by_position["configuration"] == "n_layers=2") & (by_position["curve"] == "GD")]
    assert list(gd.groupby("position")["value"].mean()) == [1.0, 0.6, 0.4]  # gd2's curve, not gd1's
    assert [p.suffix for p in plot_learning_curves(runs, tmp_path / "lc")] == [".png", ".pdf"]
    assert [p.suffix for p in plot_mse_by_position(runs, tmp_path / "bp")] == [".png", ".pdf"]
    assert plot_learning_curves(runs.assign(run_dir="/nonexistent"), tmp_path / "none") == []  # no records: none
