"""Issue 15, fault 7: a frozen DDP rank (SIGSTOP one of two CPU gloo ranks) no longer hangs the job. Collectives
wait at most trainer.ddp_timeout_s, then rank 0 saves interrupted.ckpt, ends its child rank and exits 1 with one
line; SIGTERM ends every rank within seconds, exit 143. (Killing a rank outright ends the other with one line: the
same path as the timeout, measured by scripts/faults.py.)"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from icar.training.failures import FAILURE_FILE
from tests.test_faults import CLI_FAST, train_cli

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="child ranks read from /proc")
DDP = [*CLI_FAST, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=100000",
       "trainer.val_check_interval=10", "hydra.run.dir=run"]


def alive(pid: int) -> bool:
    """Running or stopped, not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def start_and_freeze_rank_1(tmp_path: Path, *overrides: str):
    """Plain DDP through the CLI (rank 0 starts rank 1); once both trained to a checkpoint, SIGSTOP rank 1."""
    proc = train_cli(tmp_path, *DDP, *overrides)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    (rank1,) = map(int, Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
    os.kill(rank1, signal.SIGSTOP)
    return proc, rank1


def test_frozen_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    proc, rank1 = start_and_freeze_rank_1(tmp_path, "trainer.ddp_timeout_s=15")
    frozen = time.monotonic()
    _, err = proc.communicate(timeout=90)
    assert time.monotonic() - frozen < 15 + 15  # it used to wait forever (30 minutes: torch's default)
    assert proc.returncode == 1 and not alive(rank1)
    line = err.strip().splitlines()[-1]
    assert line.startswith("DDP: rank 0 stopped at step ") and "Timed out waiting 15000ms" in line, err[-2000:]
    assert "trainer.ddp_timeout_s=15 s" in line and line.endswith("interrupted.ckpt")
    assert "Traceback" not in err
    assert torch.load(tmp_path / "run/checkpoints/interrupted.ckpt", weights_only=False)["global_step"] >= 10
    assert (tmp_path / "run" / FAILURE_FILE).read_text().strip() == line


def test_sigterm_ends_every_rank_while_one_is_frozen(tmp_path):
    proc, rank1 = start_and_freeze_rank_1(tmp_path)
    time.sleep(1)  # rank 0 is now blocked in a collective with the frozen rank
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 15  # the issue saw both alive 20 minutes later
    assert proc.returncode == 128 + signal.SIGTERM and not alive(rank1)
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped by SIGTERM at step ") and "blocked 5 s in a collective" in line, err[-2000:]
    assert line.endswith(f"resume with ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}")
