"""A paper figure from a finished figure sweep: the claim's figure drawn into SWEEP/aggregate/ and its record
(figure.json: numbers, figures, wall time, machine, command, scale) saved beside it."""

from __future__ import annotations

from pathlib import Path

from icar.analysis.runs import load_runs
from icar.claims.record import FigureRecord, command_line, machine, now
from icar.claims.registry import FIGURES
from icar.orchestration.resumable import INVOCATIONS_DIR

AGGREGATE_DIR = "aggregate"


def sweep_figures() -> list[str]:
    """The figures drawn from a sweep (fig4 is made by its own script, scripts/fig4.py)."""
    return [name for name, figure in FIGURES.items() if figure.draw is not None]


def sweep_wall_time(sweep_dir: Path) -> float | None:
    """Seconds the sweep ran: for each invocation into its folder (a sweep continued after an interruption has
    several: invocations/<n>.yaml, then multirun.yaml, each written when it started), from its start to the last
    summary.json written before the next one started; the gaps between invocations do not count."""
    sweep_dir = Path(sweep_dir)
    saved = [*sorted(sweep_dir.glob(f"{INVOCATIONS_DIR}/*.yaml")), sweep_dir / "multirun.yaml"]
    starts = sorted(p.stat().st_mtime for p in saved if p.is_file())
    ends = sorted(p.stat().st_mtime for p in sweep_dir.glob("*/summary.json"))
    if not starts or not ends:
        return None
    total = 0.0
    for start, following in zip(starts, [*starts[1:], float("inf")]):
        within = [e for e in ends if start <= e < following]
        total += max(within) - start if within else 0.0
    return total


def make_figure(figure: str, sweep_dir: Path) -> FigureRecord:
    """Draw `figure` from the runs of sweep_dir into SWEEP/aggregate/ and save its record (figure.json), with the
    scale whose sweep config the runs came from (the claim's protocol), the sweep's wall time (from its
    multirun.yaml, written when Hydra starts the sweep) and this machine."""
    if figure not in sweep_figures():
        raise ValueError(f"unknown figure {figure!r}; known: {', '.join(sweep_figures())}")
    claim_figure = FIGURES[figure]
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / AGGREGATE_DIR
    runs = load_runs(sweep_dir)
    try:
        scale = claim_figure.scale_of({str(n) for n in runs["name"]} if "name" in runs else set())
    except ValueError as err:
        raise ValueError(f"{sweep_dir} holds {err}") from None
    numbers, paths = claim_figure.draw(runs, out)
    wall = sweep_wall_time(sweep_dir)
    record = FigureRecord(figure=figure, numbers=numbers.to_json(), figures=[str(p) for p in paths], wall_s=wall,
                          machine=machine(), command=command_line(), scale=scale, finished=now())
    record.save(out)
    return record
