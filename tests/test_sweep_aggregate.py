"""Aggregating a Hydra multirun from its run folders: the table, the swept keys, the figure with GD overlaid."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from icar.analysis.runs import find_runs, load_runs, swept_keys
from tests.conftest import FAST, REPO


def test_multirun_is_aggregated_offline(tmp_path):
    """Two depths x two seeds: runs.csv has 4 rows with each run's config and metrics; the MSE-versus-depth figure
    overlays GD with as many steps as layers; a folder without runs is a one-line error."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "scripts/train.py", "-m", "model.n_layers=1,2", "seed=0,1", *FAST, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(find_runs(sweep)) == 4

    runs = load_runs(sweep)
    assert swept_keys(runs) == ["model.n_layers"]  # the seed is the spread, not a swept choice
    assert sorted(zip(runs["model.n_layers"], runs["seed"])) == [(1, 0), (1, 1), (2, 0), (2, 1)]

    proc = subprocess.run([sys.executable, "scripts/analyze.py", str(sweep)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(sweep / "aggregate" / "runs.csv")
    assert len(table) == 4 and {"val/mse_last", "val/gd2/mse_last", "model.n_layers"} <= set(table.columns)
    for suffix in ("png", "pdf"):
        assert (sweep / "aggregate" / f"val_mse_last_vs_model.n_layers.{suffix}").stat().st_size > 0

    with pytest.raises(FileNotFoundError, match="no run folders"):
        load_runs(tmp_path / "empty")
