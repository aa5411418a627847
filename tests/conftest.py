"""Shared fixtures: compose configs from conf/ the way scripts/train.py does, keep W&B off the network, and the
throwaway PostgreSQL server and SLURM cluster."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from icar.orchestration.hydra_config import register_configs
from icar.orchestration.jobs import job_folders

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
REPO = CONF_DIR.parent

# No test touches the network: W&B is forced offline unless a test sets its own mode.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)

# Small and fast: what every smoke run adds to its overrides.
FAST = [
    "logger=none",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=8",
    "data.val_size=16",
]


def job_folder(sweep: Path, num: int, timeout: float = 0.0) -> Path:
    """The folder of job `num` of a sweep's latest invocation (named by its config, not its number), waiting up to
    `timeout` seconds for the job to start."""
    deadline = time.monotonic() + timeout
    while (folder := job_folders(sweep).get(num)) is None:
        assert time.monotonic() < deadline, f"job {num} of {sweep} has no folder"
        time.sleep(0.2)
    return folder


def compose_train(run_dir: Path, *overrides: str) -> DictConfig:
    """conf/train.yaml composed with `overrides`, its run folder set to `run_dir`."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"run_dir={run_dir}"])


@pytest.fixture
def make_cfg(tmp_path: Path):
    """make_cfg(*overrides, sub="run") -> a composed config whose run folder is tmp_path/sub."""

    def make(*overrides: str, sub: str = "run") -> DictConfig:
        return compose_train(tmp_path / sub, *overrides)

    return make


def skip_or_fail_without(find: Callable[[], object], unavailable: type[Exception], required: bool, switch: str) -> None:
    """Skip where a server's binaries are missing (`find` raises `unavailable`), or fail where `switch`=1 (CI)."""
    try:
        find()
    except unavailable as e:
        if required:
            pytest.fail(f"{e} ({switch}=1, so not skipped)", pytrace=False)
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL of a throwaway PostgreSQL server started for the session (tests/postgres.py).
    Skipped where PostgreSQL is not installed, unless ICAR_REQUIRE_POSTGRES=1 (CI), where it fails."""
    from tests.postgres import PostgresUnavailable, find_bindir, postgres_server, require_postgres

    skip_or_fail_without(find_bindir, PostgresUnavailable, require_postgres(), "ICAR_REQUIRE_POSTGRES")
    with postgres_server() as server:
        yield server.url


@pytest.fixture(scope="session")
def slurm():
    """A throwaway single-node SLURM cluster started for the session (tests/slurm.py): a `SlurmCluster` whose `env`
    points clients and jobs at it. Skipped where SLURM or munge is not installed, unless ICAR_REQUIRE_SLURM=1 (CI),
    where it fails."""
    from tests.slurm import SlurmUnavailable, find_binaries, require_slurm, slurm_cluster

    skip_or_fail_without(find_binaries, SlurmUnavailable, require_slurm(), "ICAR_REQUIRE_SLURM")
    with slurm_cluster() as cluster:
        yield cluster
