"""Faults that used to lose work or leave records that lie (issue 15): each is reproduced and its outcome checked
(exit code, the one line of error, what is on disk). Subprocesses only where the fault needs a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from icar.training.checkpoint_io import AtomicCheckpointIO, CheckpointError
from icar.config import ConfigError, validate
from icar.orchestration.hydra_config import run_dir_for
from icar.training.config_io import to_dataclass
from icar.training.loggers import read_metrics
from icar.training.wandb_resume import wandb_history
from icar.run import run
from tests.conftest import FAST, REPO
from tests.test_train import StopAt

TRAIN = str(REPO / "scripts" / "train.py")
CLI_FAST = [*FAST, "eval.analysis=false"]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def train_cli(cwd: Path, *overrides: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """`python scripts/train.py overrides` started in `cwd` (its runs/ and multirun/ go there)."""
    # a launch of its own, as from a shell: its own launch id and its own W&B service (a child inherits the parent's
    # WANDB_SERVICE and shares it; a SIGKILLed child would then leave its run id in use in this process's service)
    env = {**{k: v for k, v in os.environ.items() if k not in ("ICAR_LAUNCH_ID", "WANDB_SERVICE")}, **(env or {})}
    return subprocess.Popen([sys.executable, TRAIN, *overrides], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def wait_for_steps(proc: subprocess.Popen, metrics: Path, steps: int = 3, timeout: float = 90) -> None:
    """Block until the run writing `metrics` has logged `steps` records (it must still be running)."""
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connecting is refused at once


# 1. W&B configured but unreachable ------------------------------------------------------------------------------
def test_wandb_key_without_network_falls_back_offline(make_cfg, tmp_path, monkeypatch, caplog):
    """A key and an unreachable server: one warning naming `wandb sync`, an offline run, local records complete."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="icar.training.wandb_mode"):
        run(make_cfg(*FAST, "logger=wandb", "eval.analysis=false"))
    assert time.monotonic() - start < 40  # it used to wait wandb's 60 s init_timeout, then die
    (warning,) = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert "wandb sync" in warning and "\n" not in warning
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run/checkpoints/last.ckpt").is_file()


def test_wandb_online_without_key_is_one_line(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError, match="no API key") as err:
        run(make_cfg(*FAST, "logger=wandb"))
    assert "\n" not in str(err.value)


# 2. divergence ---------------------------------------------------------------------------------------------------
def test_divergence_stops_with_one_line_and_exit_1(tmp_path):
    proc = train_cli(tmp_path, *CLI_FAST, "trainer.max_steps=50", "optim.lr=1e6", "hydra.run.dir=run")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("diverged: train/loss = nan at step ")
    summary = strict_json((tmp_path / "run" / "summary.json").read_text())
    assert summary["diverged"] is True and summary["global_step"] < 50
    [strict_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not (tmp_path / "run/checkpoints/interrupted.ckpt").exists()  # no checkpoint of non-finite weights


# 3. folders named to the second ------------------------------------------------------------------------------------
def test_launches_in_the_same_second_get_their_own_folders(tmp_path):
    procs = [train_cli(tmp_path, *CLI_FAST, "name=x", "trainer.max_steps=2") for _ in range(2)]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    folders = list((tmp_path / "runs" / "x").iterdir())
    assert len(folders) == 2
    for folder in folders:  # each record once: steps 0, 1 of train/loss
        assert [r["step"] for r in read_metrics(folder) if "train/loss" in r] == [0, 1]


def test_refused_config_leaves_no_run_folder(tmp_path):
    proc = train_cli(tmp_path, *CLI_FAST, "name=x", "model.n_heads=0")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip().splitlines() == ["config error: model.n_heads must be >= 1, got 0"]
    assert not list((tmp_path / "runs" / "x").glob("*"))


# 4. resuming with another config ---------------------------------------------------------------------------------
def test_resume_with_another_config_is_refused_and_recorded(make_cfg, tmp_path):
    common = [*FAST, "model.n_heads=2", "eval.analysis=false"]
    run(make_cfg(*common))
    original = (tmp_path / "run" / "config.yaml").read_text()
    last = tmp_path / "run/checkpoints/last.ckpt"
    with pytest.raises(ConfigError, match=r"model.n_heads: 2 -> 4.*seed: 0 -> 1.*resume_override=true") as err:
        run(make_cfg(*common, "model.n_heads=4", "seed=1", "trainer.max_steps=6", f"ckpt_path={last}"))
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "resumes").exists()
    run(make_cfg(*common, "trainer.max_steps=6", f"ckpt_path={last}"))  # a longer run: no opt-in needed
    run(make_cfg(*common, "optim.lr=0.001", "trainer.max_steps=8", "resume_override=true", f"ckpt_path={last}"))
    assert (tmp_path / "run" / "config.yaml").read_text() == original
    from omegaconf import OmegaConf

    first, second = (OmegaConf.load(tmp_path / f"run/resumes/{n}.yaml") for n in (1, 2))
    assert set(first.changed) == {"ckpt_path", "trainer.max_steps"} and not first.resume_override
    assert second.changed["optim.lr"].new == 0.001 and second.resume_override and second.step == 6


def test_a_resumed_launch_keeps_the_original_hydra_folder(tmp_path):
    run_folder = tmp_path / "runs/x/2026-01-01_00-00-00-1"
    ckpt = run_folder / "checkpoints" / "last.ckpt"
    assert run_dir_for(str(ckpt), "runs/x/2026-02-02_00-00-00").startswith(str(run_folder / "resumes") + "/")
    assert run_dir_for(None, "runs/x/2026-02-02_00-00-00") == f"runs/x/2026-02-02_00-00-00-{os.environ['ICAR_LAUNCH_ID']}"


# 5. a resumed run's metrics ------------------------------------------------------------------------------------
def test_resumed_metrics_hold_one_record_per_step(make_cfg, tmp_path):
    """Stopped at step 7 with validation every 5, resumed from last.ckpt (step 5): steps 5, 6 are logged again,
    once; the record equals an uninterrupted run's."""
    common = [*FAST, "trainer.max_steps=10", "trainer.val_check_interval=5", "eval.analysis=false"]
    run(make_cfg(*common, sub="full"))
    with pytest.raises(RuntimeError, match="simulated"):
        run(make_cfg(*common, sub="cut"), callbacks=[StopAt(7)])
    run(make_cfg(*common, f"ckpt_path={tmp_path / 'cut/checkpoints/last.ckpt'}", sub="cut"))

    def losses(sub: str) -> list[tuple[int, float]]:
        return [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path / sub) if "train/loss" in r]

    assert [s for s, _ in losses("cut")] == list(range(10))
    assert losses("cut") == losses("full")


def wandb_run_records(folder: Path) -> list[dict]:
    """The run record (id, resume flag, start time) of each offline W&B segment in folder/wandb, read back with
    `wandb leet inspect --json` (wandb 0.31 has no Python reader of .wandb files)."""
    wandb_cli = str(Path(sys.executable).parent / "wandb")
    records = []
    for log in sorted((folder / "wandb").glob("offline-run-*/run-*.wandb")):
        out = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(log)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        records += [json.loads(line)["run"] for line in out.splitlines() if '"type":"run"' in line]
    return records


def test_a_killed_and_resumed_run_is_one_complete_wandb_run(make_cfg, tmp_path):
    """Offline, wandb 0.31 writes one folder per process (wandb/offline-run-<start time>-<id>, -1, -2 for segments
    started in the same second) and honours resume when syncing: every segment carries the run's one id and
    resume=true, so `wandb sync RUN/wandb/offline-run-*` uploads them, in start-time order, as one run. A SIGKILLed
    segment loses its unflushed tail (often all of it); the resume logs those steps again from metrics.jsonl, so the
    segments together hold every recorded step."""
    common = [*CLI_FAST, "logger=wandb", "trainer.val_check_interval=10"]
    proc = train_cli(tmp_path, *common, "trainer.max_steps=100000", "hydra.run.dir=run")
    folder = tmp_path / "run"
    deadline = time.monotonic() + 90
    while not ((folder / "checkpoints/last.ckpt").exists() and len((folder / "metrics.jsonl").read_text().splitlines()) >= 18):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.kill()
    proc.communicate()
    run(make_cfg(*common, "trainer.max_steps=30", f"ckpt_path={folder / 'checkpoints/last.ckpt'}"))

    run_id = (folder / "wandb_id.txt").read_text().strip()
    names = [p.name for p in (folder / "wandb").glob("offline-run-*")]
    assert len(names) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", n) for n in names)
    segments = wandb_run_records(folder)  # a segment killed this early kept only its header: no run record
    assert segments and {r["run_id"] for r in segments} == {run_id} and all(r["resume"] for r in segments)
    recorded = sorted(r["step"] for r in read_metrics(folder) if "train/loss" in r)
    assert recorded == list(range(30))  # the record: each step once
    in_wandb = {step for step, keys in wandb_history(folder).items() if "train/loss" in keys}
    assert in_wandb >= set(recorded)  # the mirror: nothing lost


# 6. exit codes -----------------------------------------------------------------------------------------------------
def test_sigterm_exits_143_and_leaves_a_checkpoint(tmp_path):
    proc = train_cli(tmp_path, *CLI_FAST, "trainer.max_steps=100000", "trainer.val_check_interval=1000",
                     "hydra.run.dir=run")
    wait_for_steps(proc, tmp_path / "run" / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step" in err
    assert torch.load(tmp_path / "run/checkpoints/interrupted.ckpt", weights_only=False)["global_step"] >= 3


# 9. checkpoints ----------------------------------------------------------------------------------------------------
def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A save that fails half-way (a full disk) leaves the previous file intact, no temporary file, and says so."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    before = target.read_bytes()

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=f"could not write checkpoint {target}: No space left on device"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_failed_interrupt_checkpoint_keeps_the_first_error(make_cfg, monkeypatch):
    def refuse(self, checkpoint, path, storage_options=None):
        raise CheckpointError(f"could not write checkpoint {path}: No space left on device")

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", refuse)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(make_cfg(*FAST, "trainer.max_steps=6", "trainer.val_check_interval=10", "eval.analysis=false"),
            callbacks=[StopAt(3)])


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_unreadable_ckpt_path_is_one_line(make_cfg, tmp_path, content):
    run(make_cfg(*FAST, "eval.analysis=false", sub="src"))
    good = (tmp_path / "src/checkpoints/last.ckpt").read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all" if content == "garbage" else good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=f"ckpt_path={bad} is not a readable checkpoint") as err:
        run(make_cfg(*FAST, f"ckpt_path={bad}"))
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_bad_precision_names_the_key(make_cfg):
    with pytest.raises(ConfigError, match="trainer.precision must be one of .*got '7'"):
        validate(to_dataclass(make_cfg("trainer.precision=7")))
