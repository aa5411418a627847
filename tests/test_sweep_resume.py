"""Issue 13: a grid sweep killed mid-way is continued by running the same command into its folder: finished jobs are
skipped, the interrupted one resumes from its checkpoint, the missing one runs, and the aggregate and figure equal
those of an uninterrupted sweep. Jobs are found by their config, so a narrowed grid never overwrites another's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from icar.config import ConfigError
from icar.orchestration.resumable import config_digest, earlier_outcome, swept_values
from icar.training.config_io import to_dataclass, to_plain_dict
from tests.conftest import FAST, REPO, job_folder

pytestmark = pytest.mark.xdist_group("figures")

# Figure 5's CPU sweep cut to three depths of one seed, long enough (300 steps) that a job can be killed between its
# first checkpoint (step 50) and its end
SWEEP = ["--config-dir", "sweeps", "--config-name", "fig5_quick", "model.n_layers=1,2,3", "seed=0",
         *[o for o in FAST if not o.startswith(("logger=", "trainer.max_steps", "trainer.val_check_interval"))],
         "logger.mode=disabled", "trainer.max_steps=300", "trainer.val_check_interval=50", "data.val_size=32"]
NUMERIC_RUN_COLUMNS_THAT_VARY = ("wall", "time", "duration")  # wall-clock columns differ between any two runs


def sweep_cmd(sweep: Path, *extra: str) -> list[str]:
    return [sys.executable, "scripts/train.py", "-m", *SWEEP, *extra, f"hydra.sweep.dir={sweep}"]


def run_sweep(sweep: Path, *extra: str) -> str:
    """Run the sweep to its end; its log (Hydra logs to stdout)."""
    proc = subprocess.run(sweep_cmd(sweep, *extra), cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ICAR_COMMAND": "make fig5"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def kill_during_job(sweep: Path, num: int) -> None:
    """Start the sweep and SIGKILL its whole process group (a crash, a reboot: nothing is saved at the signal) once
    job `num` has written its first checkpoint and before it finishes."""
    proc = subprocess.Popen(sweep_cmd(sweep), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "ICAR_COMMAND": "make fig5"})
    deadline = time.monotonic() + 300
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            folder = job_folder(sweep, num, timeout=300)
            if (folder / "checkpoints" / "last.ckpt").is_file():
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (folder / "summary.json").exists(), "job ended before it could be killed: widen its window"


def final_numbers(sweep: Path) -> tuple[pd.DataFrame, dict]:
    runs = pd.read_csv(sweep / "aggregate" / "runs.csv").sort_values("model.n_layers").reset_index(drop=True)
    keep = [c for c in runs.columns if pd.api.types.is_numeric_dtype(runs[c])
            and not any(v in c for v in NUMERIC_RUN_COLUMNS_THAT_VARY)]
    record = json.loads((sweep / "aggregate" / "figure.json").read_text())
    return runs[keep], record["numbers"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("resume") / "multirun" / "fig5_quick" / "whole"
    run_sweep(sweep)
    return sweep


def test_a_killed_sweep_rerun_runs_only_what_was_missing_and_aggregates_the_same(uninterrupted, tmp_path):
    sweep = tmp_path / "multirun" / "fig5_quick" / "killed"
    kill_during_job(sweep, 1)
    finished, interrupted = job_folder(sweep, 0), job_folder(sweep, 1)
    finished_at = (finished / "summary.json").stat().st_mtime_ns
    assert len([p for p in sweep.iterdir() if (p / ".hydra").is_dir()]) == 2  # job 2 never started

    log = run_sweep(sweep)
    assert f"{finished.name}: finished earlier, skipped" in log
    assert f"{interrupted.name}: interrupted earlier, resuming from last.ckpt" in log
    assert (finished / "summary.json").stat().st_mtime_ns == finished_at  # not trained again
    resumes = list((interrupted / "resumes").glob("*.yaml"))
    assert len(resumes) == 1 and OmegaConf.load(resumes[0]).step in (50, 100, 150, 200, 250)
    assert json.loads((job_folder(sweep, 2) / "summary.json").read_text())["global_step"] == 300
    assert (sweep / "invocations" / "1.yaml").is_file()  # the first command's multirun.yaml is kept
    for figure in ("learning_curves.png", "mse_by_position_by_configuration.png", "report.html"):
        assert (sweep / "aggregate" / figure).stat().st_size > 0

    # the same three folders as the uninterrupted sweep, and the same aggregate and figure numbers
    assert sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir()) == \
        sorted(p.name for p in uninterrupted.iterdir() if (p / ".hydra").is_dir())
    (runs, numbers), (whole_runs, whole_numbers) = final_numbers(sweep), final_numbers(uninterrupted)
    pd.testing.assert_frame_equal(runs, whole_runs, rtol=1e-5)
    assert numbers.keys() == whole_numbers.keys()
    for key, value in numbers.items():
        if isinstance(value, float) and "wall" not in key:
            assert value == pytest.approx(whole_numbers[key], rel=1e-5, abs=1e-9), key


def test_a_narrowed_grid_into_an_old_folder_reuses_matching_jobs_and_overwrites_none(uninterrupted):
    before = {p.name: (p / "summary.json").stat().st_mtime_ns for p in uninterrupted.iterdir() if (p / ".hydra").is_dir()}
    log = run_sweep(uninterrupted, "model.n_layers=3,4")  # job 0 is n_layers=3 (done), job 1 is new
    after = {p.name: (p / "summary.json").stat().st_mtime_ns for p in uninterrupted.iterdir() if (p / ".hydra").is_dir()}
    assert after.items() >= before.items()  # every earlier run untouched
    (new,) = set(after) - set(before)
    assert ",model.n_layers=4," in new and "finished earlier, skipped" in log
    assert OmegaConf.load(uninterrupted / new / "config.yaml").model.n_layers == 4
    assert len(pd.read_csv(uninterrupted / "aggregate" / "runs.csv")) == 4  # the aggregate covers every job


def test_job_identity_is_the_experiment_config():
    base = {"name": "a", "seed": 0, "run_dir": "x", "model": {"n_layers": 1}, "trainer": {"max_steps": 10}}
    assert config_digest(base) == config_digest({**base, "name": "b", "run_dir": "y", "logger": {"kind": "none"},
                                                 "trainer": {"max_steps": 10, "enable_progress_bar": False}})
    assert config_digest(base) != config_digest({**base, "seed": 1})
    assert config_digest(base) != config_digest({**base, "trainer": {"max_steps": 20}})  # a longer run is another
    assert swept_values(["seed=1", "data.path=/a b", "model.n_layers=2"], {"seed", "model.n_layers"}) == \
        "model.n_layers=2,seed=1"


def test_a_folder_of_another_config_is_refused_not_overwritten(tmp_path, make_cfg):
    cfg = to_dataclass(make_cfg())
    recorded = to_plain_dict(cfg)
    recorded["seed"] += 1
    OmegaConf.save(OmegaConf.create(recorded), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="holds a run of another config .*seed"):
        earlier_outcome(tmp_path, cfg)
    recorded["seed"] -= 1
    recorded["trainer"]["enable_progress_bar"] = not recorded["trainer"]["enable_progress_bar"]
    OmegaConf.save(OmegaConf.create(recorded), tmp_path / "config.yaml")
    assert earlier_outcome(tmp_path, cfg) is None and cfg.ckpt_path is None  # same experiment, nothing to resume


def test_make_resume_continues_the_named_sweep_folder_and_keeps_its_record(tmp_path):
    def dry_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60, env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")})

    sweep = tmp_path / "multirun" / "fig5" / "2026-12-05_10-00-00"
    sweep.mkdir(parents=True)
    proc = dry_run("fig5", "SCALE=paper", f"RESUME={sweep}/")
    assert proc.returncode == 0, proc.stderr
    assert f"--config-name fig5 hydra.sweep.dir={sweep} " in proc.stdout
    assert f"reproduction.py --keep {sweep}/" in proc.stdout  # its record, not another's
    typo = dry_run("fig5", "SCALE=paper", f"RESUME={sweep}x")  # a typo never starts a new sweep silently
    assert typo.returncode != 0 and f"RESUME={sweep}x: no such sweep folder" in typo.stderr
    if (REPO / "multirun" / "sweep_d_quick").exists():
        return  # this checkout has run that sweep: RESUME=last would find it
    missing = dry_run("sweep-d", "SCALE=cpu", "RESUME=last", "VENV=/nonexistent-venv")
    assert missing.returncode != 0 and "RESUME=last: no sweep folder below multirun/sweep_d_quick/" in missing.stderr


def test_a_diverged_job_fails_again_without_training(tmp_path, make_cfg):
    from icar.orchestration.resumable import EarlierFailure

    cfg = to_dataclass(make_cfg())
    OmegaConf.save(OmegaConf.create(to_plain_dict(cfg)), tmp_path / "config.yaml")
    (tmp_path / "summary.json").write_text(json.dumps({"diverged": True, "diverged_step": 7, "global_step": 7}))
    (tmp_path / "failure.txt").write_text("diverged at step 7: train/loss = nan\n")
    with pytest.raises(EarlierFailure, match="failed earlier: diverged at step 7"):
        earlier_outcome(tmp_path, cfg)


def test_wall_time_adds_up_the_invocations_not_the_gaps_between_them(tmp_path):
    from icar.orchestration.figures import sweep_wall_time

    def touch(path: Path, t: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        os.utime(path, (t, t))

    t0 = 1_800_000_000.0
    touch(tmp_path / "invocations" / "1.yaml", t0)  # the first invocation: two jobs, then killed
    touch(tmp_path / "a" / "summary.json", t0 + 10)
    touch(tmp_path / "b" / "summary.json", t0 + 20)
    touch(tmp_path / "multirun.yaml", t0 + 3600)  # resumed an hour later: one more job
    touch(tmp_path / "c" / "summary.json", t0 + 3630)
    assert sweep_wall_time(tmp_path) == pytest.approx(20 + 30)


def test_a_record_with_figure_paths_relative_to_the_make_folder_keeps_its_pngs(tmp_path, monkeypatch):
    from icar.claims.record import FigureRecord
    from icar.orchestration.results import keep_record

    monkeypatch.chdir(tmp_path)  # figure targets run from the checkout: make_figure records paths relative to it
    aggregate = Path("multirun/fig6_quick/t0/aggregate")
    aggregate.mkdir(parents=True)
    (aggregate / "fig6.png").write_bytes(b"png")
    FigureRecord(figure="fig6", numbers={}, figures=[str(aggregate / "fig6.png"), str(aggregate / "fig6.pdf")],
                 scale="cpu").save(aggregate)
    kept = keep_record(aggregate / "figure.json", tmp_path / "results")
    assert (kept / "fig6.png").read_bytes() == b"png" and FigureRecord.load(kept / "figure.json").figures == ["fig6.png"]
    (aggregate / "fig6.png").unlink()
    with pytest.raises(FileNotFoundError, match="fig6.png"):  # a listed figure that is gone is said, not dropped
        keep_record(aggregate / "figure.json", tmp_path / "results")


def test_the_results_folder_is_committed_whole():
    """.gitignore ignores the checkout's run folders, not the runs/ kept under results/."""
    proc = subprocess.run(["git", "check-ignore", "-q", "results/fig5/paper/runs/x/summary.json"], cwd=REPO)
    assert proc.returncode == 1  # not ignored
    assert subprocess.run(["git", "check-ignore", "-q", "runs/x/summary.json"], cwd=REPO).returncode == 0
