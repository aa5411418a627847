"""Grid sweeps (sweeps/*.yaml) and launchers: every sweep config composes into valid runs, a reduced sweep ends with
its aggregate (CSV, figure, report, W&B group), joblib runs two jobs at once, the SLURM and GPU launcher configs
compose, and parallel jobs never share a device."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from icar.config import TrainConfig, TrainerConfig, validate

from icar.orchestration.hydra_config import gpu_count, register_configs

from icar.training.config_io import to_dataclass
from icar.orchestration.devices import claim_devices
from icar.training.loggers import read_metrics
from tests.conftest import CONF_DIR, FAST, REPO, job_folder

SWEEPS = REPO / "sweeps"
SWEEP_NAMES = ("depth", "heads", "T", "d")
# the grid of each sweep at paper scale and quick scale: (swept key, values), with 2 attention kinds x seeds
GRIDS = {
    "depth": ("model.n_layers", list(range(1, 9)), list(range(1, 5))),
    "heads": ("model.n_heads", [1, 2, 4, 8, 16, 32, 64], [1, 2, 4, 8]),
    "T": ("data.T", [10, 20, 50, 100], [10, 20, 50]),
    "d": ("data.d", [2, 4, 5, 8, 10, 16], [2, 4, 5, 8]),
}


def compose_sweep(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(SWEEPS), version_base="1.3"):
        return compose(name, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides],
                       return_hydra_config=True)


def expand(params: dict[str, str]) -> list[dict[str, str]]:
    """The jobs of a basic-sweeper grid (comma lists and range(a,b))."""
    values = {}
    for key, spec in params.items():
        if spec.startswith("range("):
            lo, hi = (int(v) for v in spec[6:-1].split(","))
            values[key] = [str(v) for v in range(lo, hi)]
        else:
            values[key] = spec.split(",")
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


@pytest.mark.parametrize("scale", ["paper", "quick"])
@pytest.mark.parametrize("name", SWEEP_NAMES)
def test_every_sweep_config_composes_into_valid_runs(name, scale):
    """The sweep's grid is what its docstring says (x linear/softmax x seeds), and the first and last job of the
    grid compose into a config that validates."""
    config_name = name if scale == "paper" else f"{name}_quick"
    cfg = compose_sweep(config_name)
    key, paper_values, quick_values = GRIDS[name]
    jobs = expand(dict(cfg.hydra.sweeper.params))
    seeds = 3 if scale == "paper" else 2
    assert len(jobs) == len(paper_values if scale == "paper" else quick_values) * 2 * seeds
    assert sorted({int(j[key]) for j in jobs}) == (paper_values if scale == "paper" else quick_values)
    assert {j["model.attention"] for j in jobs} == {"linear", "softmax"}
    assert cfg.hydra.callbacks.aggregate._target_ == "icar.orchestration.sweep.AggregateOnSweepEnd"
    for job in (jobs[0], jobs[-1]):
        job_cfg = compose_sweep(config_name, *(f"{k}={v}" for k, v in job.items()), "run_dir=/tmp/unused")
        train_cfg = to_dataclass(OmegaConf.masked_copy(job_cfg, [k for k in job_cfg if k != "hydra"]))
        validate(train_cfg)
        assert isinstance(train_cfg, TrainConfig)
    if name == "heads":
        assert cfg.data.tokens == "raw" and cfg.model.positional == "softmax_positional"
    else:
        assert cfg.data.tokens == "augmented"


def test_reduced_sweep_ends_with_its_aggregate_report_and_wandb_group(tmp_path):
    """sweeps/depth_quick.yaml narrowed on the command line to 2 depths x linear x 1 seed, extended by 2 learning
    rates, a few steps, W&B offline: the runs share one W&B group (the sweep folder) and carry their swept values
    as tags (the command line's lr included); the end-of-sweep callback writes runs.csv, the MSE-versus-depth
    figure, report.html and an offline W&B run of the aggregate."""
    sweep = tmp_path / "multirun" / "sweep_depth_quick" / "t0"
    overrides = [o for o in FAST if not o.startswith("logger=")] + [
        "logger.mode=offline", "model.n_layers=1,2", "seed=0", "model.attention=linear", "optim.lr=0.01,0.02",
        f"hydra.sweep.dir={sweep}"]
    cmd = [sys.executable, "scripts/train.py", "-m", "--config-dir", "sweeps", "--config-name", "depth_quick",
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "raised" not in proc.stderr, proc.stderr[-3000:]  # Hydra reports a failed callback only as a warning

    runs = pd.read_csv(sweep / "aggregate" / "runs.csv")
    assert len(runs) == 4 and set(runs["logger.group"]) == {"sweep_depth_quick/t0"}
    for run_dir in runs["run_dir"]:
        tags = OmegaConf.load(Path(run_dir) / "config.yaml").logger.tags
        assert {t.split("=")[0] for t in tags} == {"model.n_layers", "model.attention", "seed", "optim.lr"}
        assert list(Path(run_dir, "wandb").glob("offline-run-*"))
    for suffix in ("png", "pdf"):
        assert (sweep / "aggregate" / f"val_mse_last_vs_model.n_layers.{suffix}").stat().st_size > 0
    report = (sweep / "aggregate" / "report.html").read_text()
    assert "val_mse_last_vs_model.n_layers" in report and "optim.lr" in report
    assert (sweep / "aggregate" / "val_mse_last_vs_optim.lr.png").is_file()
    assert list((sweep / "aggregate" / "wandb").glob("offline-run-*"))


def test_joblib_launcher_runs_two_jobs_at_once(tmp_path):
    """hydra/launcher=joblib with n_jobs=2 on CPU: the two runs' logging intervals overlap in time."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "scripts/train.py", "-m", "seed=0,1", *FAST, "trainer.max_steps=300",
           "trainer.val_check_interval=100", "eval.analysis=false", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spans = []  # from the run's start (config.yaml written) to its end (summary.json written)
    for job in (job_folder(sweep, 0), job_folder(sweep, 1)):
        spans.append(((job / "config.yaml").stat().st_mtime, (job / "summary.json").stat().st_mtime))
        assert json.loads((job / "summary.json").read_text())["global_step"] == 300
        assert read_metrics(job)
    (start0, end0), (start1, end1) = spans
    assert max(start0, start1) < min(end0, end1), spans  # both were training at the same moment


def test_cluster_and_gpu_launcher_configs_compose():
    """hydra/launcher=slurm (submitit) asks one task and one GPU per device of the run (no GPU for a CPU run);
    hydra/launcher=gpus is joblib with one job per visible GPU."""
    cfg = compose_sweep("depth", "hydra/launcher=slurm", "trainer.devices=4", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes, launcher.partition) == (4, 4, 1, "gpu")
    assert launcher.submitit_folder.startswith("multirun/sweep_depth/")
    assert launcher.max_num_timeout == 3  # the plugin's default 0 would never requeue a job at its time limit
    cpu = compose_sweep("depth", "hydra/launcher=slurm", "trainer.devices=2", "trainer.accelerator=cpu").hydra.launcher
    assert (cpu.tasks_per_node, cpu.gpus_per_node) == (2, None)  # CPU ranks ask no GPUs
    cfg = compose_sweep("heads", "hydra/launcher=gpus")
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert cfg.hydra.launcher.n_jobs == gpu_count() >= 1


def test_parallel_jobs_claim_distinct_devices(tmp_path):
    """Two jobs take different devices of two; a third waits until one is released; asking for more than exist
    fails."""
    with claim_devices(1, 2, tmp_path) as first, claim_devices(1, 2, tmp_path) as second:
        assert sorted(first + second) == [0, 1]
        with pytest.raises(TimeoutError):
            with claim_devices(1, 2, tmp_path, poll_s=0.05, timeout_s=0.3):
                pass
    got: list[list[int]] = []
    with claim_devices(2, 2, tmp_path) as both:
        assert both == [0, 1]
        waiter = threading.Thread(target=lambda: got.append(_claim_once(tmp_path)))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not got  # waits while both are held
    waiter.join(10)
    assert got == [[0]]
    with pytest.raises(ValueError):
        with claim_devices(3, 2, tmp_path):
            pass


def _claim_once(lock_dir: Path) -> list[int]:
    with claim_devices(1, 2, lock_dir, poll_s=0.05, timeout_s=10) as ids:
        return ids


def test_multi_device_jobs_of_a_local_sweep_use_ddp_spawn(monkeypatch):
    """Plain ddp re-executes the command line (which would restart the sweep): inside a local sweep it becomes
    ddp_spawn; a single run and a SLURM job keep their strategy."""
    import icar.orchestration.job as job

    trainer = TrainerConfig(accelerator="cpu", devices=2, strategy="ddp")
    assert job.job_devices(trainer)[:2] == (None, "ddp")  # not in a sweep: trainer.devices of them, ddp
    for launcher, strategy in (("hydra._internal.core_plugins.basic_launcher.BasicLauncher", "ddp_spawn"),
                               ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "ddp_spawn"),
                               ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "ddp")):
        monkeypatch.setattr(job, "sweep_launcher", lambda: launcher)
        assert job.job_devices(trainer)[:2] == (None, strategy), launcher
