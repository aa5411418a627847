"""A resumed run's offline W&B mirror made complete again from the run's record (metrics.jsonl).

wandb 0.31 writes its offline transaction log in 32 KiB blocks and flushes the last, partial one only when the run
finishes (wandb-core, transactionlog.Writer): a SIGKILLed process loses up to 32 KiB of its records, often the whole
of a short run (its .wandb file is then the 7-byte header). Each process writes its own segment,
wandb/offline-run-<start>-<id>, and `wandb sync` uploads the segments of one run id in start-time order as one run.
So on resume, the steps the earlier segments lack are logged again, from metrics.jsonl, at the start of the new
segment; its training then logs the steps from the checkpoint on.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from icar import metrics
from icar.training.loggers import METRICS_FILE, read_metrics

log = logging.getLogger(__name__)


def wandb_history(run_dir: Path) -> dict[int, set[str]]:
    """{trainer/global_step: the metric names logged at it} over the offline W&B segments of a run, read back with
    `wandb leet inspect` (wandb 0.31 has no Python reader of .wandb files)."""
    cli = str(Path(sys.executable).parent / "wandb")
    held: dict[int, set[str]] = {}
    for segment in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        try:
            out = subprocess.run([cli, "leet", "inspect", "--json", str(segment)], capture_output=True, text=True,
                                 timeout=120).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            if '"type":"history"' in line:
                item = json.loads(line)["history"]["item"]
                if item.get(metrics.WANDB_STEP) is not None:
                    held.setdefault(int(item[metrics.WANDB_STEP]), set()).update(item)
    return held


def missing_records(records: list[dict[str, Any]], held: dict[int, set[str]], before: int) -> list[dict[str, Any]]:
    """The scalar metrics of the records with step < `before` (the resumed run will not log them again) that no W&B
    segment holds at their step. Curves (lists) stay in metrics.jsonl: W&B shows them as plots of a validation."""
    out = []
    for record in records:
        step = record.get("step")
        if step is None or step >= before:
            continue
        scalars = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))
                   and k not in held.get(step, ())}
        if scalars:
            out.append({**scalars, metrics.WANDB_STEP: step})
    return out


def complete_offline_history(experiment: Any, run_dir: Path, resumed_step: int) -> int:
    """Log into the new segment `experiment` (a wandb Run) the recorded steps below `resumed_step` that the earlier
    offline segments lost; returns how many records were logged again."""

    if not (Path(run_dir) / METRICS_FILE).is_file():
        return 0
    replay = missing_records(read_metrics(run_dir), wandb_history(run_dir), resumed_step)
    for row in replay:
        experiment.log(row)
    if replay:
        log.info(f"W&B: {len(replay)} records of steps < {resumed_step} that the interrupted segment lost were"
                 f" logged again from {Path(run_dir) / METRICS_FILE}")
    return len(replay)
