"""Issue 15, faults 6 and 10 for sweeps and run folders: a grid sweep with a failed job, or stopped by SIGTERM, ends
on one line naming what finished, what failed (its line) and what did not run, with a non-zero exit; analysis says
the same of a sweep folder, and of a killed run at which step it stopped."""

from __future__ import annotations

import runpy
import signal
import sys
from pathlib import Path

import pytest

from icar.orchestration.jobs import Job, jobs_line, run_state, sweep_jobs
from icar.training.failures import FAILURE_FILE
from tests.conftest import REPO, job_folder
from tests.test_faults import CLI_FAST, train_cli, wait_for_steps
from tests.test_train import StopAt

ANALYZE = str(REPO / "scripts" / "analyze.py")


def analyze(capsys, *paths: Path) -> tuple[int, str]:
    """(exit status, stdout) of scripts/analyze.py, run in this process (its imports are loaded already)."""
    main = runpy.run_path(ANALYZE)["main"]
    argv = sys.argv
    sys.argv = [ANALYZE, *map(str, paths)]
    try:
        status = main()
    finally:
        sys.argv = argv
    return status, capsys.readouterr().out


def test_jobs_line_names_failures_and_what_did_not_run():
    jobs = [Job(0, None, "finished"), Job(1, None, "failed", "config error: model.n_heads must be >= 1, got 0"),
            Job(2, None, "failed", "stopped by SIGTERM at step 9; resume with ckpt_path=x"),
            *(Job(n, None, "not run") for n in (3, 4, 5, 7))]
    assert jobs_line(jobs) == ("1 of 7 jobs finished; job 1 failed: config error: model.n_heads must be >= 1, got 0;"
                               " job 2 stopped by SIGTERM at step 9; resume with ckpt_path=x; jobs 3-5, 7 did not run")


def test_a_failed_grid_job_is_named_and_the_sweep_exits_1(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    proc = train_cli(tmp_path, "-m", *CLI_FAST, "model.n_heads=0,1", f"hydra.sweep.dir={sweep}")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1
    expected = f"sweep {sweep}: 1 of 2 jobs finished; job 0 failed: config error: model.n_heads must be >= 1, got 0"
    assert err.strip().splitlines()[-1] == expected
    assert "Traceback" not in err  # the job's failure is its one line
    assert (job_folder(sweep, 0) / FAILURE_FILE).read_text().startswith("config error: model.n_heads")

    status, out = analyze(capsys, sweep)
    assert status == 0
    assert out.splitlines()[0] == expected.replace("sweep ", "", 1)
    assert "aggregate: 1 runs" in out


def test_sigterm_during_a_grid_sweep_says_which_jobs_did_not_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = train_cli(tmp_path, "-m", *CLI_FAST, "seed=0,1,2", "trainer.max_steps=100000",
                     "trainer.val_check_interval=1000", f"hydra.sweep.dir={sweep}")
    wait_for_steps(proc, job_folder(sweep, 0, timeout=90) / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM  # it used to exit 0, the other jobs silently never run
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sweep {sweep}: 0 of 3 jobs finished; job 0 stopped by SIGTERM at step ")
    assert last.endswith("interrupted.ckpt; jobs 1, 2 did not run")


def test_a_killed_run_is_unfinished_at_the_step_of_its_last_checkpoint(make_cfg, tmp_path, capsys):
    """What SIGKILL leaves (metrics, last.ckpt at the last validation, no summary, no failure.txt): analysis says the
    run is unfinished and at which step, before analysing last.ckpt. A crash writes failure.txt, a resume that
    finishes removes it."""
    common = [*CLI_FAST, "trainer.max_steps=10", "trainer.val_check_interval=5"]
    with pytest.raises(RuntimeError, match="simulated"):
        from icar.run import run

        run(make_cfg(*common), callbacks=[StopAt(7)])
    folder = tmp_path / "run"
    assert (folder / FAILURE_FILE).read_text() == "RuntimeError: simulated interruption\n"
    (folder / FAILURE_FILE).unlink()
    (folder / "checkpoints" / "interrupted.ckpt").unlink()
    state, detail = run_state(folder)
    assert (state, detail.split(" (")[0]) == ("unfinished", "last checkpoint at step 5 of 10")

    status, out = analyze(capsys, folder)
    assert status == 0
    assert out.splitlines()[0].startswith(f"{folder}: unfinished: last checkpoint at step 5 of 10 (resume")

    (folder / FAILURE_FILE).write_text("RuntimeError: simulated interruption\n")
    run(make_cfg(*common, f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"))
    assert not (folder / FAILURE_FILE).exists() and run_state(folder) == ("finished", "")
    assert [j.state for j in sweep_jobs(tmp_path)] == []  # not a Hydra sweep: no jobs to count
