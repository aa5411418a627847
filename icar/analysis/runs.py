"""The finished runs below a folder (a sweep, a figure's records) as one table: one row per run, its flattened config
(`model.n_layers`, `data.T`, ...), its final metrics (`val/mse_last`, `val/gd3/mse_last`, `analysis/...`) and
`run_dir`; which config keys the runs swept; and a run's trained model and analysis tables.

A run folder is any folder holding config.yaml and summary.json (what `icar.training.run.train` writes) and no
failure.txt (a diverged run writes a summary too).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from icar.metrics import ANALYSIS_DIR, ANALYSIS_FILE
from icar.training.failures import FAILURE_FILE
from icar.training.module import ICARModule

IGNORED_KEYS = ("run_dir", "ckpt_path", "seed", "name")  # differ between runs without being a swept choice
IGNORED_PREFIXES = ("logger.", "trainer.enable_progress_bar")


def first_value(runs: pd.DataFrame, column: str) -> str | None:
    """The most common non-empty value of `column` across the runs (e.g. their `logger.group`), or None."""
    values = runs[column].dropna().astype(str).str.strip() if column in runs else pd.Series(dtype=str)
    values = values[values != ""]
    return values.mode().iloc[0] if len(values) else None


def find_runs(sweep_dir: Path) -> list[Path]:
    """Finished run folders below sweep_dir (itself included), in path order: a diverged or otherwise failed run
    (failure.txt) is left out; icar.orchestration.jobs says which are missing and why."""
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
    """{key: value} of a run's `key=value` W&B tags (what its sweep swept, icar.orchestration.job.sweep_context); `tags` is the
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


def configurations(runs: pd.DataFrame) -> pd.Series:
    """Each run's configuration as a label, 'experiment=augmented_depth, attention=linear': its swept values but the
    seed, from its tags where it has them (a swept `experiment` is no config column), else from the swept keys;
    group keys are dropped from the names ('model.attention' -> 'attention')."""
    keys = [k for k in swept_keys(runs) if k != "seed"]

    def label(run: pd.Series) -> str:
        swept = {k: v for k, v in swept_values(run.get("logger.tags")).items() if k != "seed"}
        if not swept:
            swept = {k: run[k] for k in keys if k in run and pd.notna(run[k])}
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in swept.items()) or "all runs"

    return runs.apply(label, axis=1) if len(runs) else pd.Series(dtype=str)


def load_model(run_dir: str | Path) -> torch.nn.Module:
    """The trained model of a run folder, from checkpoints/last.ckpt, on the CPU."""
    module = ICARModule.load_from_checkpoint(Path(run_dir) / "checkpoints" / "last.ckpt", map_location="cpu")
    return module.model.eval()


def analysis_tables(run_dir: str | Path) -> dict[str, Any]:
    """A run's analysis/analysis.json (numbers, GD's step sizes, the MSE-by-position curves); {} if it has none."""
    path = Path(run_dir) / ANALYSIS_DIR / ANALYSIS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
