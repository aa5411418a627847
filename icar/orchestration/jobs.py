"""What became of each job of a sweep and of a run folder, from what they left on disk: finished (summary.json),
failed (failure.txt: its one line), unfinished (the step of its last checkpoint) or never run (a grid sweep's
planned job without a folder); and the one line that says so, printed at the end of a sweep that did not finish
every job (`ReportUnfinishedJobs`) and by `scripts/analyze.py`.

Light imports only (no torch unless a checkpoint's step is read): Hydra instantiates the callback for every run.
"""

from __future__ import annotations

import atexit
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from icar.orchestration.resumable import INVOCATIONS_DIR
from icar.training.failures import FAILURE_FILE

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class Job:
    num: int
    folder: Path | None
    state: str  # finished | failed | unfinished | not run
    detail: str = ""


def checkpoint_step(path: Path) -> int | None:
    """global_step of a checkpoint, read without loading its tensors into memory; None when unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception:
        return None


def run_state(folder: Path) -> tuple[str, str]:
    """(state, detail) of one run folder: failed with its line, finished, or unfinished at the step of its latest
    checkpoint (of how many planned, from config.yaml)."""
    folder = Path(folder)
    if (folder / FAILURE_FILE).is_file():
        return "failed", (folder / FAILURE_FILE).read_text().strip()
    if (folder / "summary.json").is_file():
        return "finished", ""
    # the latest checkpoint; of equal steps the one to resume from: interrupted, then last, then the others
    order = {"interrupted.ckpt": 0, "last.ckpt": 1}
    found = [(step, -order.get(p.name, 2), p) for p in (folder / "checkpoints").glob("*.ckpt")
             if (step := checkpoint_step(p)) is not None]
    if not found:
        return "unfinished", "no checkpoint yet (stopped before its first validation, or still running)"
    step, _, latest = max(found)
    planned = ""
    if (folder / "config.yaml").is_file():
        planned = f" of {OmegaConf.load(folder / 'config.yaml').trainer.max_steps}"
    return "unfinished", f"last checkpoint at step {step}{planned} (resume with ckpt_path={latest})"


def planned_jobs(sweep_dir: Path) -> int | None:
    """How many jobs a grid sweep (Hydra's basic sweeper) planned, from its multirun.yaml; None for other sweepers."""
    saved = Path(sweep_dir) / "multirun.yaml"
    if not saved.is_file():
        return None
    cfg = OmegaConf.load(saved)
    if cfg.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides([*params, *cfg.hydra.overrides.task])
        return len(BasicSweeper.split_arguments(overrides, None)[0])
    except Exception:  # a sweep syntax this reader does not know: count the folders instead
        return None


def job_folders(sweep_dir: Path) -> dict[int, Path]:
    """{job number: folder} of the jobs of the sweep's latest invocation that started (Hydra wrote their
    .hydra/hydra.yaml after it wrote multirun.yaml); a folder left by an earlier invocation of a continued sweep
    (icar.orchestration.resumable) is not one of its jobs."""
    found = {}
    saved = Path(sweep_dir) / "multirun.yaml"
    continued = (Path(sweep_dir) / INVOCATIONS_DIR).is_dir()  # only then can a folder be of an earlier invocation
    since = saved.stat().st_mtime if saved.is_file() and continued else 0.0
    for hydra_yaml in Path(sweep_dir).glob("*/.hydra/hydra.yaml"):
        if hydra_yaml.stat().st_mtime < since:
            continue
        try:
            num = OmegaConf.load(hydra_yaml).hydra.job.get("num")
        except Exception:  # being written by a job that is starting (read while the sweep runs): not started yet
            continue
        if num is not None:
            found[int(num)] = hydra_yaml.parent.parent
    return found


def sweep_jobs(sweep_dir: Path) -> list[Job]:
    """Every job of a sweep folder, planned or started, in job order."""
    folders = job_folders(sweep_dir)
    planned = planned_jobs(sweep_dir)
    numbers = range(max(planned, max(folders, default=-1) + 1)) if planned is not None else sorted(folders)
    jobs = []
    for num in numbers:
        folder = folders.get(num)
        jobs.append(Job(num, folder, *run_state(folder)) if folder is not None else Job(num, None, "not run"))
    return jobs


def _numbers(nums: list[int]) -> str:
    """[2, 3, 4, 7] -> 'jobs 2-4, 7'; [5] -> 'job 5'."""
    spans: list[list[int]] = []
    for n in nums:
        if spans and n == spans[-1][-1] + 1:
            spans[-1].append(n)
        else:
            spans.append([n])
    text = ", ".join(f"{s[0]}-{s[-1]}" if len(s) > 2 else ", ".join(map(str, s)) for s in spans)
    return f"job{'s' if len(nums) > 1 else ''} {text}"


def jobs_line(jobs: list[Job], shown: int = 3) -> str:
    """'2 of 3 jobs finished; job 1 failed: <its line>; job 2 did not run' (the first `shown` failures in full)."""
    done = sum(j.state == "finished" for j in jobs)
    parts = [f"{done} of {len(jobs)} jobs finished"]
    failed = [j for j in jobs if j.state == "failed"]
    parts += [f"job {j.num} {j.detail}" if j.detail.startswith("stopped") else f"job {j.num} failed: {j.detail}"
              for j in failed[:shown]]
    if len(failed) > shown:
        parts.append(f"{len(failed) - shown} more failed ({_numbers([j.num for j in failed[shown:]])})")
    parts += [f"job {j.num} unfinished: {j.detail}" for j in jobs if j.state == "unfinished"]
    missing = [j.num for j in jobs if j.state == "not run"]
    if missing:
        parts.append(f"{_numbers(missing)} did not run")
    return "; ".join(parts)


class ReportUnfinishedJobs(Callback):
    """At the exit of a grid sweep that did not finish every job (a job failed, SIGTERM, a crash), one line on
    stderr: how many jobs finished, which failed and why, which did not run. Hydra calls no callback when a sweep
    aborts, so the line is printed at interpreter exit; a sweep that completes unregisters it."""

    def __init__(self) -> None:
        self._sweep_dir: Path | None = None

    def _report(self) -> None:
        if self._sweep_dir is None or planned_jobs(self._sweep_dir) is None:
            return
        jobs = sweep_jobs(self._sweep_dir)
        if jobs and any(j.state != "finished" for j in jobs):
            print(f"sweep {self._sweep_dir}: {jobs_line(jobs)}", file=sys.stderr, flush=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = Path(config.hydra.sweep.dir)
        atexit.register(self._report)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        atexit.unregister(self._report)
        self._report()  # every job returned; a job whose failure its sweeper recorded is still named
