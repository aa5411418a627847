"""icar on a live SLURM cluster (the throwaway one of tests/slurm.py): a grid sweep as a submitit job array equals
the same sweep run locally; jobs requeued by SLURM (SIGTERM) or by their time-limit signal (USR2) resume in their run
folder and W&B run and end bit-identical to uninterrupted runs; a DDP job's two ranks are SLURM's two tasks; Optuna
workers as SLURM jobs share one PostgreSQL study and survive one of them being cancelled mid-trial."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from icar.orchestration.jobs import job_folders
from icar.training.loggers import read_metrics
from tests.conftest import FAST, REPO, job_folder

pytestmark = pytest.mark.xdist_group("slurm")  # make test -n: one SLURM cluster, in one worker

# one CPU, a little memory and a short time limit per job: the test node has what this machine has
SLURM = ["hydra/launcher=slurm", "trainer.accelerator=cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=15"]
SWEEP = ["-m", "--config-dir", "sweeps", "--config-name", "depth_quick"]


def train_command(*args: str) -> list[str]:
    return [sys.executable, "scripts/train.py", *args]


def run(cluster, cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=timeout)
    proc.wall_s = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def array_tasks(cluster, sweep: Path) -> dict[int, dict[str, str]]:
    """The SLURM records of the sweep's job array, by task index (= Hydra job number)."""
    names = {p.name for p in (sweep / ".submitit").iterdir()} if (sweep / ".submitit").is_dir() else set()
    tasks = {}
    for job in cluster.jobs():
        if job.get("ArrayTaskId") and f"{job['ArrayJobId']}_{job['ArrayTaskId']}" in names:
            tasks[int(job["ArrayTaskId"])] = job
    return tasks


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock time of each record."""
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir)]


def assert_same_run(run: Path, reference: Path) -> None:
    """Same summary, same metric records (each step once), same final weights and optimiser state."""
    assert json.loads((run / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    assert records(run) == records(reference)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False) for d in (run, reference))
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert repr(a["optimizer_states"]) == repr(b["optimizer_states"])


def test_cluster_starts_two_tasks(slurm):
    """The fixture's node takes jobs: `srun -n 2` starts ranks 0 and 1 on it."""
    out = slurm.run("srun", "-n", "2", "bash", "-c", "echo $SLURM_PROCID $SLURM_NTASKS $(hostname -s)").stdout
    assert sorted(out.split("\n")[:2]) == [f"0 2 {slurm.node}", f"1 2 {slurm.node}"]
    assert slurm.cpus >= 2


def test_grid_sweep_as_job_array_equals_local_sweep(slurm, tmp_path):
    """sweeps/depth_quick.yaml narrowed to 2 depths x 2 attentions (4 runs), W&B offline: through hydra/launcher=slurm
    it is one job array of 4 tasks that all complete, and its aggregate (runs.csv, figure, report, the aggregate's
    W&B run) holds exactly the numbers of the same sweep run locally (the basic launcher)."""
    overrides = [o for o in FAST if not o.startswith("logger=")] + [
        "logger.mode=offline", "model.n_layers=1,2", "seed=0", "model.attention=linear,softmax", "eval.gd_steps=2",
        "trainer.max_steps=20", "trainer.val_check_interval=10"]
    on_slurm, local = tmp_path / "multirun" / "slurm", tmp_path / "multirun" / "local"
    array = run(slurm, train_command(*SWEEP, *overrides, *SLURM, f"hydra.sweep.dir={on_slurm}"))
    basic = run(slurm, train_command(*SWEEP, *overrides, f"hydra.sweep.dir={local}"))
    print(f"\nwall time, 4 runs: job array {array.wall_s:.1f} s, local sweep {basic.wall_s:.1f} s")

    tasks = {i: slurm.wait_ended(f"{t['ArrayJobId']}_{i}") for i, t in array_tasks(slurm, on_slurm).items()}
    assert sorted(tasks) == [0, 1, 2, 3] and len({t["ArrayJobId"] for t in tasks.values()}) == 1
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks.values())
    a, b = (pd.read_csv(d / "aggregate" / "runs.csv") for d in (on_slurm, local))
    assert len(a) == 4 and list(a.columns) == list(b.columns)
    differ = [c for c in a.columns if not a[c].equals(b[c])]
    assert sorted(differ) == ["logger.group", "run_dir"]  # the folders differ, every number is the same
    assert set(a["logger.group"]) == {"slurm"}
    for sweep in (on_slurm, local):
        assert (sweep / "aggregate" / "val_mse_last_vs_model.n_layers.png").stat().st_size > 0
        assert "val_mse_last_vs_model.n_layers" in (sweep / "aggregate" / "report.html").read_text()
        assert list((sweep / "aggregate" / "wandb").glob("offline-run-*"))


def _training_step(run_dir: Path) -> int:
    """The last step a run has logged train/loss at (-1 before its first)."""
    try:
        return max((r["step"] for r in read_metrics(run_dir) if "train/loss" in r), default=-1)
    except (FileNotFoundError, json.JSONDecodeError):  # not started, or a line being written
        return -1


def test_requeued_jobs_resume_bit_identically(slurm, tmp_path):
    """Two array jobs of 200 steps, W&B offline. Once each is past its first validation, job 0 is requeued by SLURM
    (`scontrol requeue`: SIGTERM, as a preemption) and job 1 gets its time-limit signal (USR2, what
    `--signal=USR2@signal_delay_s` sends before the limit), on which submitit requeues it. Each checkpoints at the end
    of its step, is requeued, restarts (SLURM_RESTART_COUNT=1) in the same run folder and W&B run, and ends with the
    summary, metric records, weights and optimiser state of the same runs done locally without interruption."""
    overrides = [o for o in FAST if not o.startswith(("logger=", "trainer.max_steps", "trainer.val_check",
                                                      "data.batch_size"))] + [
        "logger.mode=offline", "model.n_layers=2", "seed=0,1", "model.attention=linear", "eval.gd_steps=1",
        "eval.analysis=false", "data.batch_size=128", "trainer.max_steps=200", "trainer.val_check_interval=40"]
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    log = (tmp_path / "sweep.log").open("w")
    sweeper = subprocess.Popen(train_command(*SWEEP, *overrides, *SLURM, f"hydra.sweep.dir={on_slurm}"), cwd=REPO,
                               env=slurm.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        signals = {0: ("scontrol", "requeue"), 1: ("scancel", "--signal=USR2")}
        sent: dict[int, int] = {}
        deadline = time.monotonic() + 300
        while len(sent) < 2:  # interrupt each job once it is training beyond its first validation (step 40)
            assert sweeper.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
            for i, job in array_tasks(slurm, on_slurm).items():
                folder = job_folders(on_slurm).get(i)  # named by its config; none until the job starts
                step = _training_step(folder) if folder is not None else -1
                if i not in sent and job["JobState"] == "RUNNING" and 50 <= step < 180:
                    slurm.run(*signals[i], f"{job['ArrayJobId']}_{i}")
                    sent[i] = step
            time.sleep(0.2)
        while sweeper.poll() is None:
            assert time.monotonic() < deadline + 300, (tmp_path / "sweep.log").read_text()[-3000:]
            _release_requeued(slurm, on_slurm)
            time.sleep(1)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
        log.close()
    assert sweeper.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    run(slurm, train_command(*SWEEP, *overrides, f"hydra.sweep.dir={local}"))

    tasks = {i: slurm.wait_ended(f"{t['ArrayJobId']}_{i}") for i, t in array_tasks(slurm, on_slurm).items()}
    for i in (0, 1):
        run_dir = job_folder(on_slurm, i)
        assert tasks[i]["JobState"] == "COMPLETED" and tasks[i]["Restarts"] == "1", tasks[i]
        resume = (run_dir / "resumes" / "1.yaml").read_text()
        assert "interrupted.ckpt" in resume and not (run_dir / "resumes" / "2.yaml").exists()
        stopped_at = int(resume.split("step: ")[1].split()[0])
        assert sent[i] <= stopped_at < 200  # stopped at a step boundary after the signal, mid-training
        assert_same_run(run_dir, job_folder(local, i))
        run_id = (run_dir / "wandb_id.txt").read_text().strip()  # one W&B run, written by both attempts
        assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    # USR2 alone requeues nothing in SLURM: job 1 came back because submitit requeued it after the checkpoint


def _release_requeued(cluster, sweep: Path) -> None:
    """A requeued job is held ~2 min (BeginTime) before it is eligible again: make it eligible now."""
    for i, job in array_tasks(cluster, sweep).items():
        if job["JobState"] == "PENDING" and job.get("Reason") == "BeginTime":
            cluster.run("scontrol", "update", f"jobid={job['ArrayJobId']}_{i}", "StartTime=now", check=False)


@pytest.mark.slow
def test_a_job_past_its_time_limit_is_requeued_until_it_finishes(slurm, tmp_path):
    """A real time limit: one job of 1500 steps with --time=1 (minute) and --signal=USR2@40 (what
    hydra.launcher.timeout_min and signal_delay_s become). SLURM signals each attempt before its limit, the run
    checkpoints, submitit counts the time-out and requeues it (max_num_timeout=3), and the attempts together end with
    the run an uninterrupted local one gives, bit for bit."""
    overrides = [o for o in FAST if not o.startswith(("logger=", "trainer.max_steps", "trainer.val_check",
                                                      "data.batch_size"))] + [
        "logger=none", "model.n_layers=2", "model.attention=linear", "eval.gd_steps=1", "eval.analysis=false",
        "data.batch_size=256", "trainer.max_steps=1500", "trainer.val_check_interval=100"]
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    limit = [o for o in SLURM if "timeout_min" not in o] + ["hydra.launcher.timeout_min=1",
                                                          "hydra.launcher.signal_delay_s=40"]
    log = (tmp_path / "sweep.log").open("w")
    start = time.monotonic()
    sweeper = subprocess.Popen(train_command("-m", *overrides, *limit, f"hydra.sweep.dir={on_slurm}"), cwd=REPO,
                               env=slurm.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while sweeper.poll() is None:
            assert time.monotonic() - start < 600, (tmp_path / "sweep.log").read_text()[-3000:]
            _release_requeued(slurm, on_slurm)
            time.sleep(1)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
        log.close()
    assert sweeper.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    run(slurm, train_command("-m", *overrides, f"hydra.sweep.dir={local}"))
    (job_id,) = [f"{t['ArrayJobId']}_{i}" for i, t in array_tasks(slurm, on_slurm).items()] or [
        j["JobId"] for j in slurm.jobs() if (on_slurm / ".submitit" / j["JobId"]).is_dir()]
    job = slurm.wait_ended(job_id)
    assert job["JobState"] == "COMPLETED" and job["TimeLimit"] == "00:01:00" and int(job["Restarts"]) >= 1, job
    resumes = sorted((job_folder(on_slurm, 0) / "resumes").glob("*.yaml"))
    assert len(resumes) == int(job["Restarts"])  # every attempt after the first resumed a checkpoint
    assert all("interrupted.ckpt" in p.read_text() for p in resumes)  # written at the signal, not the last validation
    assert_same_run(job_folder(on_slurm, 0), job_folder(local, 0))
    print(f"\ntime limit 1 min: {job['Restarts']} requeues, {time.monotonic() - start:.0f} s in all")


def test_ddp_job_gets_its_two_ranks_from_slurm(slurm, tmp_path):
    """trainer.devices=2 on CPU through hydra/launcher=slurm: one job of two tasks, each task one rank (Lightning
    reads SLURM_PROCID; nothing re-executes the command line), and val/mse is the exact mean over all 17 validation
    sequences, as one process computes it from the final checkpoint."""
    from tests.test_ddp import _single_process_val_mse

    sweep = tmp_path / "ddp"
    run(slurm, train_command("-m", *FAST, *SLURM, "trainer.devices=2", "data.val_size=17", "eval.analysis=false",
                             f"hydra.sweep.dir={sweep}"))
    (job_id,) = [j["JobId"] for j in slurm.jobs() if (sweep / ".submitit" / j["JobId"]).is_dir()]
    job = slurm.wait_ended(job_id)
    assert job["JobState"] == "COMPLETED" and job["NumTasks"] == "2"
    folder = sweep / ".submitit" / job["JobId"]
    logs = {int(p.name.split("_")[-2]): p.read_text() + p.with_suffix(".out").read_text()  # Lightning logs via Hydra
            for p in folder.glob("*_log.err")}
    assert sorted(logs) == [0, 1]  # one log per SLURM task
    for rank, text in logs.items():
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in text
    assert len([p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 1
    job_dir = job_folder(sweep, 0)
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["global_step"] == 4
    assert summary["val/mse"] == pytest.approx(_single_process_val_mse(job_dir / "checkpoints/last.ckpt"), rel=1e-6)


def test_optuna_workers_as_slurm_jobs_survive_a_cancelled_one(slurm, postgres_url, tmp_path):
    """Two SLURM jobs (an array) each run a sweeper of one PostgreSQL study (n_trials=3) in one shared sweep folder,
    as workers on a cluster's shared file system. Worker 0 is cancelled (`scancel`) mid-trial: its trial's heartbeat
    stops, worker 1 fails it as stale and runs its retry, which continues the cancelled run from its checkpoint in its
    folder. The study ends with exactly 3 complete trials, no parameters run twice, and the cancelled trial failed."""
    sweep = tmp_path / "search"
    # 200 steps: the window between a trial's first checkpoint and its end stays seconds wide on a loaded machine, where
    # one poll (scontrol, the study) can take a second (at 80 steps a loaded CI run missed every window)
    STEPS = 200
    study = f"slurm_{tmp_path.name}"[:60]
    worker = " ".join(train_command(
        "-m", *FAST, "eval.gd_steps=1", "eval.analysis=false", "hparams_search=linear_lr",
        f"hydra.sweeper.study_name={study}", f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.n_trials=3",
        "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=4", "data.batch_size=64",
        f"trainer.max_steps={STEPS}", "trainer.val_check_interval=20", f"hydra.sweep.dir={sweep}"))
    array_id = slurm.run("sbatch", "--parsable", "--array=0-1", "-c", "1", f"--chdir={REPO}",
                         f"--output={tmp_path}/worker_%a.log", "--wrap", worker).stdout.strip()
    deadline = time.monotonic() + 400

    def storage_trials():
        try:
            return optuna.load_study(study_name=study, storage=postgres_url).get_trials()
        except KeyError:  # not created yet
            return []

    cancelled = None
    while cancelled is None:  # a trial of worker 0 past its first checkpoint
        assert time.monotonic() < deadline, (tmp_path / "worker_0.log").read_text()[-3000:]
        job0 = slurm.job(f"{array_id}_0")
        for t in storage_trials():
            run_dir = Path(t.user_attrs.get("run_dir", "/nonexistent"))
            if (t.state == TrialState.RUNNING and job0.get("JobState") == "RUNNING"
                    and t.user_attrs.get("slurm_job") == f"{array_id}_0"
                    and (run_dir / "checkpoints" / "last.ckpt").is_file() and _training_step(run_dir) < STEPS - 10):
                slurm.run("scancel", f"{array_id}_0")
                cancelled = t
                break
        time.sleep(0.2)
    slurm.wait_for(lambda: slurm.job(f"{array_id}_1").get("JobState") in ("COMPLETED", "FAILED"), 400,
                   "worker 1 to finish")
    assert slurm.job(f"{array_id}_0")["JobState"] == "CANCELLED"
    assert slurm.job(f"{array_id}_1")["JobState"] == "COMPLETED", (tmp_path / "worker_1.log").read_text()[-3000:]

    trials = storage_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3  # no parameters run twice
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == cancelled.number
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    assert retry.user_attrs["run_dir"] == failed.user_attrs["run_dir"]  # continued in the cancelled run's folder
    run_dir = Path(retry.user_attrs["run_dir"])
    assert (run_dir / "resumes" / "1.yaml").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == STEPS
    assert len(trials) == 4 and {t.state for t in trials} == {TrialState.COMPLETE, TrialState.FAIL}

