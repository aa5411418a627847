"""The committed records: `results/<figure>/<scale>/` holds one figure's record (figure.json), its PNGs, the sweep's
runs table and each run's summary.json and config.yaml; small files, so that a clean clone regenerates
REPRODUCTION.md (`make reproduction`) without training anything. A figure target copies its record here when it
ends (`scripts/reproduction.py --keep`); checkpoints, metrics and W&B files stay in the ignored run folders."""

from __future__ import annotations

import shutil
from pathlib import Path

from icar.claims.record import RECORD_FILE, FigureRecord
from icar.metrics import SUMMARY_FILE

RESULTS_DIR = "results"
RUNS_DIR = "runs"  # results/<figure>/<scale>/runs/<job folder>/{summary.json,config.yaml}
RUN_FILES = (SUMMARY_FILE, "config.yaml")
TABLES = ("runs.csv",)


def newest_record(folder: Path) -> Path:
    """The record (figure.json) below `folder` that finished last: `folder` is a sweep or fig4 run folder, or a
    folder of them (multirun/fig5/, runs/fig4/). FileNotFoundError when there is none."""
    found = sorted(Path(folder).rglob(RECORD_FILE), key=lambda p: (FigureRecord.load(p).finished, p.stat().st_mtime))
    found = [p for p in found if RESULTS_DIR not in p.relative_to(folder).parts]
    if not found:
        raise FileNotFoundError(f"no {RECORD_FILE} below {folder}: run the figure target first")
    return found[-1]


def keep_record(record_path: Path, results: Path) -> Path:
    """Copy a figure's record, its PNGs, runs table and every run's summary.json and config.yaml into
    results/<figure>/<scale>/ (replacing what was there); return the folder. Figure paths in the copied record are
    relative to it."""
    record_path = Path(record_path)
    record = FigureRecord.load(record_path)
    out = Path(results) / record.figure / record.scale.value
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    kept = []
    for figure in (Path(f) for f in record.figures if str(f).endswith(".png")):
        # as recorded (absolute, or relative to where the figure target ran), else beside the record
        source = next((p for p in (figure, record_path.parent / figure.name) if p.is_file()), None)
        if source is None:
            raise FileNotFoundError(f"{record_path} lists {figure}, which is neither there nor beside the record")
        shutil.copy2(source, out / figure.name)
        kept.append(figure.name)
    for table in TABLES:
        if (record_path.parent / table).is_file():
            shutil.copy2(record_path.parent / table, out / table)
    # the runs the record summarises: a sweep's job folders (SWEEP/<job>/summary.json), or fig4's own folder
    sweep = record_path.parent.parent if record_path.parent.name == "aggregate" else record_path.parent
    for summary in sorted(sweep.glob(f"*/{SUMMARY_FILE}")) if sweep != record_path.parent else []:
        target = out / RUNS_DIR / summary.parent.name
        target.mkdir(parents=True)
        for name in RUN_FILES:
            if (summary.parent / name).is_file():
                shutil.copy2(summary.parent / name, target / name)
    if sweep == record_path.parent:
        for name in RUN_FILES:
            if (sweep / name).is_file():
                shutil.copy2(sweep / name, out / name)
    record.figures = kept
    record.save(out)
    return out
