"""Recompute the analyses of finished runs from their checkpoints, or aggregate a sweep, offline (no W&B):

    python scripts/analyze.py RUN_DIR [RUN_DIR ...] [--checkpoint best]
    python scripts/analyze.py SWEEP_DIR            # a Hydra multirun folder: its run folders, aggregated

Each RUN_DIR/analysis/ receives the figures (PNG + PDF) and analysis.json (numbers, GD step sizes, curves); a
SWEEP_DIR/aggregate/ receives runs.csv (one row per finished run) and the MSE against every swept value, GD overlaid.
A sweep with jobs that failed or never ran, or a run that did not finish, is named first ("2 of 3 jobs finished;
job 1 failed: <its line>", "unfinished: last checkpoint at step 40 of 100").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from icar.analysis.analyze import ANALYSIS_FILE, analyze_run_dir  # noqa: E402
from icar.orchestration.jobs import job_folders, jobs_line, run_state, sweep_jobs  # noqa: E402
from icar.analysis.runs import find_runs  # noqa: E402
from icar.orchestration.sweep import aggregate  # noqa: E402

HEADLINE = ("summary/", "heads/", "P/", "C/", "theory/", "icmap/")


def is_sweep(folder: Path) -> bool:
    """A Hydra multirun folder (multirun.yaml, job folders) or any folder of run folders, rather than one run."""
    if (folder / "checkpoints").is_dir():
        return False
    return (folder / "multirun.yaml").is_file() or bool(job_folders(folder)) or bool(find_runs(folder))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (with checkpoints/) or sweep folders")
    parser.add_argument("--checkpoint", default="last", help="checkpoint name in RUN/checkpoints/ (last, best, ...)")
    parser.add_argument("--device", default="cpu", help="torch device for the evaluation (cpu, cuda)")
    args = parser.parse_args()

    failed = 0
    for run_dir in tqdm(args.run_dirs, desc="analysing runs", disable=len(args.run_dirs) == 1):
        if is_sweep(run_dir):
            jobs = sweep_jobs(run_dir)
            if jobs:  # what is missing from the aggregate, and why
                print(f"{run_dir}: {jobs_line(jobs)}")
            runs = find_runs(run_dir)
            if not runs:
                print(f"{run_dir}: no finished run to aggregate", file=sys.stderr)
                failed += 1
                continue
            figures = aggregate(run_dir)
            print(f"{run_dir}/aggregate: {len(runs)} runs -> " + ", ".join(sorted(figures)))
            continue
        state, detail = run_state(run_dir)
        if state != "finished" and (run_dir / "checkpoints").is_dir():
            print(f"{run_dir}: {state}: {detail}; analysing checkpoints/{args.checkpoint}.ckpt")
        try:
            result = analyze_run_dir(run_dir, args.checkpoint, args.device)
        except (FileNotFoundError, ValueError) as err:
            print(f"{run_dir}: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{run_dir}/analysis/{ANALYSIS_FILE}: {len(result.figures)} figures, {len(result.scalars)} numbers")
        for name, value in sorted(result.scalars.items()):
            if name.startswith(HEADLINE):
                print(f"  {name:40s} {value:.4g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
