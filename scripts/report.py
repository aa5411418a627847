"""Report a sweep (a Hydra multirun folder): a local HTML page always, a W&B Report when asked and possible.

    python scripts/report.py SWEEP_DIR [--title T] [--project P] [--entity E] [--publish]

Reads SWEEP_DIR/aggregate/runs.csv (aggregating the run folders first when it is missing), writes
SWEEP_DIR/aggregate/report.html (figures, a summary per swept configuration, every run), and builds a W&B Report over
the runs of the sweep's W&B group. `--publish` saves that report to W&B, which needs an API key and WANDB_MODE neither
offline nor disabled; offline runs must be synced first (`wandb sync SWEEP_DIR/*/wandb/offline-run-*`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from icar.orchestration.report import (  # noqa: E402
    build_wandb_report,
    publish_wandb_report,
    report_summary,
    write_html_report,
)
from icar.analysis.runs import first_value, swept_keys  # noqa: E402
from icar.orchestration.figures import AGGREGATE_DIR  # noqa: E402
from icar.orchestration.job import sweep_group  # noqa: E402
from icar.orchestration.sweep import aggregate  # noqa: E402
from icar.training.wandb_mode import has_wandb_key  # noqa: E402

OFFLINE_MODES = ("offline", "disabled", "dryrun")  # WANDB_MODE values under which nothing reaches the server


def default_group(runs: pd.DataFrame, sweep_dir: Path) -> str:
    """The runs' `logger.group` (set by every sweep), else the group a sweep in this folder would have had."""
    group = first_value(runs, "logger.group")
    if group:
        return group
    return sweep_group(sweep_dir)


def why_not_published(publish: bool) -> str | None:
    """Why the report is not saved to W&B now, or None when it can be."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if not publish:
        return "--publish not given"
    if mode in OFFLINE_MODES:
        return f"WANDB_MODE={mode}"
    return None if has_wandb_key() else "no W&B API key"


def load_table(sweep_dir: Path) -> pd.DataFrame:
    """SWEEP/aggregate/runs.csv, written first from the run folders when missing; a one-line exit without runs."""
    table = sweep_dir / AGGREGATE_DIR / "runs.csv"
    if not table.is_file():
        try:
            aggregate(sweep_dir)
        except FileNotFoundError as err:
            sys.exit(f"report.py: {err}")
    runs = pd.read_csv(table)
    if runs.empty:
        sys.exit(f"report.py: no runs in {table}")
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder (or one holding aggregate/runs.csv)")
    parser.add_argument("--title", help="report title (default: 'icar sweep <group>')")
    parser.add_argument("--project", help="W&B project (default: the runs' logger.project, else icar)")
    parser.add_argument("--entity", help="W&B entity (default: the runs' logger.entity, else the key's default)")
    parser.add_argument("--group", help="W&B group of the sweep's runs (default: logger.group, else the folder)")
    parser.add_argument("--publish", action="store_true", help="save the report to W&B (online, API key needed)")
    args = parser.parse_args()

    sweep_dir = args.sweep_dir
    if not sweep_dir.is_dir():
        sys.exit(f"report.py: {sweep_dir} is not a folder")
    runs = load_table(sweep_dir)
    swept = swept_keys(runs)
    figures = sorted((sweep_dir / AGGREGATE_DIR).glob("*.png"))
    group = args.group or default_group(runs, sweep_dir)
    title = args.title or f"icar sweep {group}"

    page = write_html_report(sweep_dir, runs, figures, swept, title)
    print(f"HTML report: {page}")

    project = args.project or first_value(runs, "logger.project") or "icar"
    entity = args.entity or first_value(runs, "logger.entity")
    report = build_wandb_report(runs, [p.stem for p in figures], swept, project, entity, group, title)
    print(f"W&B report: {report_summary(report)}")

    why = why_not_published(args.publish)
    if why is None:
        try:
            print(f"W&B report published: {publish_wandb_report(report)}")
        except Exception as err:  # whatever the server answers, in one line
            sys.exit(f"report.py: publishing the W&B report failed: {type(err).__name__}: {err}")
        return 0
    print(f"W&B report not published ({why}). To publish: wandb sync {sweep_dir}/*/wandb/offline-run-* "
          f"(offline runs), then python scripts/report.py {sweep_dir} --publish with an API key, online.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
