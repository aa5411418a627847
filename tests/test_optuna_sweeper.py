"""The Optuna sweeper plugin (hydra_plugins/icar_optuna_sweeper) end to end, through `scripts/train.py -m`: a study
resumed after its sweeper is killed, a raising trial, pruning through the shared storage, two workers on one
PostgreSQL study; and the search-space grammar."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from icar.orchestration.tuning import SearchSpaceError, exclusive_ask, override_value, parse_search_space
from tests.conftest import FAST, REPO

QUIET = ["eval.gd_steps=1", "eval.analysis=false", "hydra.sweeper.sampler=random", "hydra.sweeper.seed=0"]


def sweep_command(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "scripts/train.py", "-m", *FAST, *QUIET, f"hydra.sweep.dir={sweep_dir}", *overrides]


def run_sweep(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(sweep_command(sweep_dir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def sqlite_study(sweep_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def _wait_for_trials(proc, log: Path, sweep: Path, study: str, storage: str | None, until, timeout: float = 300):
    """Poll the study until `until(trials)` is true, while the sweeper `proc` runs."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            trials = optuna.load_study(study_name=study, storage=storage or f"sqlite:///{sweep / 'optuna.db'}").get_trials()
        except Exception:  # the study or its database does not exist yet
            trials = []
        if until(trials):
            return trials
        time.sleep(0.05)


def _running_with_checkpoint(trials):
    """A RUNNING trial past its first validation (its last.ckpt written), not yet at its end."""
    for t in trials:
        run_dir = Path(t.user_attrs.get("run_dir", "/nonexistent"))
        if t.state == TrialState.RUNNING and (run_dir / "checkpoints" / "last.ckpt").is_file() \
                and not (run_dir / "summary.json").exists():
            return t
    return None


HEARTBEAT = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=3")


def test_study_recovers_after_the_sweeper_is_killed(tmp_path):
    """4 trials on SQLite; the sweeper is killed (SIGKILL) once 2 are complete and the third is past a checkpoint;
    the same command again ends with exactly 4 complete trials: the killed trial's heartbeat stops, so the new sweeper
    fails it as stale (after the grace period) and runs its retry, which has the same parameters and continues the
    killed run from its checkpoint in its folder; n_trials counts the retry, not the stale trial."""
    sweep = tmp_path / "search"
    overrides = ("hparams_search=linear_lr", "hydra.sweeper.n_trials=4",  # 80 steps: below the pruner's warm-up
                 "trainer.max_steps=80", "trainer.val_check_interval=20", *HEARTBEAT)
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(sweep_command(sweep, *overrides), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _wait_for_trials(proc, tmp_path / "first.log", sweep, "search_linear_lr", None,
                         lambda ts: sum(t.state == TrialState.COMPLETE for t in ts) == 2 and _running_with_checkpoint(ts))
        proc.kill()
        proc.wait()
    killed = sqlite_study(sweep, "search_linear_lr").get_trials()
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]

    run_sweep(sweep, *overrides)
    trials = sqlite_study(sweep, "search_linear_lr").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and len(trials) == 5
    assert trials[2].state == TrialState.FAIL  # the killed trial, failed as stale
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 2]
    assert retry.state == TrialState.COMPLETE and retry.params == killed[2].params
    assert retry.user_attrs["run_dir"] == str(sweep / "trial_2")  # continued in the killed run's folder
    assert (sweep / "trial_2" / "resumes" / "1.yaml").is_file() and not (sweep / f"trial_{retry.number}").exists()
    for t in killed[:2]:  # finished trials keep their result
        assert trials[t.number].value == t.value
    assert len({t.params["optim.lr"] for t in complete}) == 4  # the resumed sampler does not replay the first proposals
    for t in complete:
        assert json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())["global_step"] == 80
        assert 1e-4 <= t.params["optim.lr"] <= 1e-1 and t.params["optim.schedule"] in ("constant", "cosine")
    results = (sweep / "optuna_results.yaml").read_text()
    assert "n_trials: 5" in results and "best_params" in results and "FAIL: 1" in results


def test_a_raising_trial_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path):
    """A grid from the command line alone (no preset): the two trials with n_heads=0 raise (config error), the two
    others complete, the sweep exits 0, and the failures carry their error."""
    sweep = tmp_path / "search"
    run_sweep(sweep, "hydra/sweeper=icar_optuna", "hydra.sweeper.sampler=grid", "hydra.sweeper.n_trials=10",
              "model.n_heads=choice(0,1)", "seed=choice(0,1)")
    trials = sqlite_study(sweep, "default").get_trials()
    assert len(trials) == 4  # n_trials is capped at the grid's 4 points
    assert sorted((t.params["model.n_heads"], t.params["seed"]) for t in trials) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for t in trials:
        if t.params["model.n_heads"] == 0:
            assert t.state == TrialState.FAIL and "model.n_heads must be >= 1" in t.user_attrs["error"]
        else:
            assert t.state == TrialState.COMPLETE and t.value > 0


def test_a_lagging_trial_is_pruned_through_the_shared_storage(tmp_path):
    """The median pruner, rebuilt by the job from the sweep's study file: after one complete trial at a useful
    learning rate, a trial at lr=1e-7 reports a worse val/mse at its first validation and is stopped there."""
    sweep = tmp_path / "search"
    common = ("hydra/sweeper=icar_optuna", "hydra.sweeper.pruner=median", "trainer.max_steps=12",
              "data.batch_size=64", "++hydra.sweeper.pruner_kwargs={n_startup_trials:1,n_warmup_steps:0}")
    run_sweep(sweep, *common, "hydra.sweeper.n_trials=1", "optim.lr=interval(0.01,0.01)")
    run_sweep(sweep, *common, "hydra.sweeper.n_trials=2", "optim.lr=interval(1e-7,1e-7)")
    first, second = sqlite_study(sweep, "default").get_trials()
    assert first.state == TrialState.COMPLETE and sorted(first.intermediate_values) == [2, 4, 6, 8, 10, 12]
    assert second.state == TrialState.PRUNED
    assert list(second.intermediate_values) == [2]  # stopped at its first report
    assert second.intermediate_values[2] > first.intermediate_values[2]
    assert not (sweep / "trial_1" / "summary.json").exists()

    changed = subprocess.run(sweep_command(sweep, *common, "hydra.sweeper.n_trials=3", "optim.lr=choice(0.1,0.2)"),
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert changed.returncode != 0 and "start a new study" in changed.stderr  # a float became a choice
    assert len(sqlite_study(sweep, "default").get_trials()) == 2


def test_two_workers_share_one_postgresql_study(tmp_path, postgres_url):
    """Two sweepers started together against one PostgreSQL study (n_trials=4 in all), each in its own folder as on
    two machines: 4 trials, numbers 0..3 each run once, by both workers."""
    overrides = ("hparams_search=linear_lr", f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.n_trials=4",
                 "trainer.max_steps=20", "trainer.val_check_interval=10")
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(2)]
    workers = [subprocess.Popen(sweep_command(tmp_path / f"worker{i}", *overrides), cwd=REPO, stdout=logs[i],
                                stderr=subprocess.STDOUT) for i in range(2)]
    for i, worker in enumerate(workers):
        assert worker.wait(timeout=600) == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]
        logs[i].close()
    trials = optuna.load_study(study_name="search_linear_lr", storage=postgres_url).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    run_dirs = sorted(p.name for i in range(2) for p in (tmp_path / f"worker{i}").glob("trial_*"))
    assert run_dirs == ["trial_0", "trial_1", "trial_2", "trial_3"]  # each trial ran once, in one worker
    assert len({t.user_attrs["sweeper"] for t in trials}) == 2  # both workers took trials


def test_a_sigkilled_workers_trial_is_retried_by_another_worker(tmp_path, postgres_url):
    """Two local workers of one PostgreSQL study (n_trials=4), each in its own folder as on two machines; worker 0 is
    SIGKILLed mid-trial. Its trial's heartbeat stops: worker 1 fails it as stale and runs its retry (same
    parameters; from scratch, the killed worker's folder being out of its reach), and the study ends with exactly 4
    complete trials, none run twice, and the killed one failed."""
    study = f"killed_{tmp_path.name}"[:60]
    overrides = ("hparams_search=linear_lr", f"hydra.sweeper.study_name={study}",
                 f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.n_trials=4", "trainer.max_steps=80",
                 "trainer.val_check_interval=20", *HEARTBEAT)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    with logs[0].open("w") as log0, logs[1].open("w") as log1:
        workers = [subprocess.Popen(sweep_command(tmp_path / f"worker{i}", *overrides), cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT) for i, log in enumerate((log0, log1))]
        pid0 = f":{workers[0].pid}"
        killed = _wait_for_trials(workers[0], logs[0], tmp_path, study, postgres_url, lambda ts: next(
            (t for t in ts if t.user_attrs.get("sweeper", "").endswith(pid0) and _running_with_checkpoint([t])),
            None))
        (victim,) = [t for t in killed if t.state == TrialState.RUNNING and t.user_attrs["sweeper"].endswith(pid0)]
        workers[0].kill()
        workers[0].wait()
        assert workers[1].wait(timeout=600) == 0, logs[1].read_text()[-3000:]
    trials = optuna.load_study(study_name=study, storage=postgres_url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and len(trials) == 5
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4  # no parameters run twice
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == victim.number
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["run_dir"] == str(tmp_path / "worker1" / f"trial_{retry.number}")
    assert not (Path(retry.user_attrs["run_dir"]) / "resumes").exists()  # started afresh in worker 1's folder


def test_a_stale_trial_whose_run_finished_is_told_from_its_summary(tmp_path):
    """A trial left RUNNING whose run had nonetheless finished (its sweeper died while its job ran on, as a submitit
    job does on SLURM): once stale, its retry is told the run's val/mse from summary.json instead of training again."""
    from omegaconf import OmegaConf

    from icar.orchestration.tuning import build_storage, parse_search_space

    sweep = tmp_path / "search"
    (sweep / "trial_0").mkdir(parents=True)
    (sweep / "trial_0" / "summary.json").write_text(json.dumps({"val/mse": 0.5, "global_step": 4.0}))
    storage = build_storage(f"sqlite:///{sweep / 'optuna.db'}", 1, 1, 3)
    study = optuna.create_study(study_name="search_linear_lr", storage=storage)
    preset = OmegaConf.load(REPO / "conf" / "hparams_search" / "linear_lr.yaml").hydra.sweeper.params
    orphan = study.ask(parse_search_space(dict(preset), []).distributions)
    orphan.set_user_attr("run_dir", str(sweep / "trial_0"))
    orphan.set_user_attr("heartbeat_interval", 1)
    storage.record_heartbeat(orphan._trial_id)
    time.sleep(2.5)  # older than the grace period

    run_sweep(sweep, "hparams_search=linear_lr", "hydra.sweeper.n_trials=1", *HEARTBEAT)
    first, retry = sqlite_study(sweep, "search_linear_lr").get_trials()
    assert first.state == TrialState.FAIL and retry.system_attrs["failed_trial"] == 0
    assert retry.state == TrialState.COMPLETE and retry.value == 0.5 and retry.params == first.params
    assert sorted(p.name for p in sweep.glob("trial_*")) == ["trial_0"]  # nothing trained again
    assert not (sweep / "trial_0" / "checkpoints").exists()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_exclusive_ask_serialises_workers(backend, tmp_path, request):
    """While one worker holds the ask lock of a study, another waits for it; a different study is not blocked."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    events: list[str] = []

    def second(study: str) -> None:
        with exclusive_ask(url, study):
            events.append(study)

    with exclusive_ask(url, "study"):
        waiting = threading.Thread(target=second, args=("study",))
        other = threading.Thread(target=second, args=("other",))
        waiting.start(), other.start()
        other.join(10)
        waiting.join(0.5)
        assert events == ["other"] and waiting.is_alive()
        events.append("released")
    waiting.join(10)
    assert events == ["other", "released", "study"]


def test_search_space_grammar():
    """Hydra's override grammar into Optuna distributions; a later entry for a key wins; fixed values pass through."""
    space = parse_search_space(
        {"optim.lr": "tag(log, interval(1e-4, 1e-1))", "model.n_layers": "range(1,9)", "seed": "0"},
        ["model.attention=linear,softmax", "model.n_heads=tag(int, interval(1, 8))", "seed=3", "data.T=choice(10,20)"],
    )
    d = space.distributions
    assert d["optim.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert d["model.n_layers"] == IntDistribution(1, 8)
    assert d["model.attention"] == CategoricalDistribution(["linear", "softmax"])
    assert d["model.n_heads"] == IntDistribution(1, 8)
    assert d["data.T"] == CategoricalDistribution([10, 20])
    assert space.fixed == ["seed=3"]
    with pytest.raises(SearchSpaceError, match="interval"):
        space.grid()
    grid = parse_search_space({}, ["model.n_layers=range(1,4)", "optim.lr=0.1,0.2"]).grid()
    assert grid == {"model.n_layers": [1, 2, 3], "optim.lr": [0.1, 0.2]}
    assert [override_value(v) for v in (0.001, True, None, "cosine", "a b")] == ["0.001", "true", "null", "cosine",
                                                                                 "'a b'"]
