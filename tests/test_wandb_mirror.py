"""W&B is a mirror that cannot stop a run (icar/training/wandb_mirror.py): SLURM signals every process of a job, so W&B's
service process can die while training goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from icar.training.loggers import read_metrics
from tests.conftest import FAST, REPO


def test_a_dead_wandb_service_does_not_stop_the_run(tmp_path):
    """wandb-core (the run's W&B service, a child process) is killed mid-training: the run trains on to its last
    step with one warning (in the run's log), exits 0 and leaves every step in metrics.jsonl and its summary."""
    run_dir = tmp_path / "run"
    overrides = [o for o in FAST if not o.startswith(("logger=", "trainer.max_steps", "trainer.val_check"))]
    cmd = [sys.executable, "scripts/train.py", *overrides, "logger=wandb", "logger.mode=offline", "eval.gd_steps=1",
           "eval.analysis=false", "trainer.max_steps=300", "trainer.val_check_interval=50", f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # its own service, not this process's
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while True:  # the W&B service is up and the run is training
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
        core = [int(c) for c in children if "wandb-core" in open(f"/proc/{c}/cmdline").read()]
        if core and (run_dir / "metrics.jsonl").is_file() and max(
                (r["step"] for r in read_metrics(run_dir) if "train/loss" in r), default=-1) >= 20:
            break
        time.sleep(0.05)
    os.kill(core[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert (run_dir / "train.log").read_text().count("W&B stopped mirroring this run") == 1  # Hydra's log of the run
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 300
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(300))
