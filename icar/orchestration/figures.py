"""A paper figure from a finished figure sweep: the claim's figure drawn into SWEEP/aggregate/ and its record
(figure.json: numbers, figures, wall time, machine, command, scale) saved beside it."""

from __future__ import annotations

from pathlib import Path

from icar.analysis.runs import load_runs
from icar.claims.figures import FIGURES
from icar.claims.record import FigureRecord, command_line, machine, now

AGGREGATE_DIR = "aggregate"


def make_figure(figure: str, sweep_dir: Path, scale: str = "") -> FigureRecord:
    """Draw `figure` from the runs of sweep_dir into SWEEP/aggregate/ and save its record (figure.json), with the
    sweep's wall time (from its multirun.yaml, written when Hydra starts the sweep) and this machine."""
    if figure not in FIGURES:
        raise ValueError(f"unknown figure {figure!r}; known: {', '.join(FIGURES)}")
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / AGGREGATE_DIR
    runs = load_runs(sweep_dir)
    names = sorted({str(n) for n in runs["name"]}) if "name" in runs else ["(unnamed)"]
    if not all(n == figure or n.startswith(f"{figure}_") for n in names):  # fig3, fig3_quick, ...
        raise ValueError(f"{sweep_dir} holds runs of {', '.join(names)}, not of the {figure} sweep "
                         f"(sweeps/{figure}.yaml or sweeps/{figure}_quick.yaml)")
    numbers, paths = FIGURES[figure](runs, out)
    # the sweep's wall time: from Hydra writing multirun.yaml (its start) to the last run's summary.json
    started = sweep_dir / "multirun.yaml"
    ends = [p.stat().st_mtime for p in sweep_dir.rglob("summary.json")]
    wall = max(ends) - started.stat().st_mtime if started.is_file() and ends else None
    scale = scale or ("cpu" if sweep_dir.parent.name.endswith("_quick") else "paper")
    record = FigureRecord(figure=figure, numbers=numbers, figures=[str(p) for p in paths], wall_s=wall,
                          machine=machine(), command=command_line(), scale=scale, finished=now())
    record.save(out)
    return record
