"""Multi-process training that cannot hang: a bounded collective timeout (`trainer.ddp_timeout_s`), SIGTERM that ends
every rank within seconds even while one is blocked in a collective, and a failed collective as one line.

A rank that is frozen (SIGSTOP, a hung device) blocks the others inside a gloo or NCCL call, in C++, where Python
runs no signal handler: Lightning's SIGTERM handling waits for the call to return, up to the process-group timeout
(30 min by default), and a stopped process cannot act on SIGTERM at all. So the timeout is ours to bound, and a
watchdog thread, woken by the signal through `signal.set_wakeup_fd`, ends the rank itself (and rank 0 its child
ranks) when the main thread has not stopped within SIGTERM_GRACE_S.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from icar.training.failures import SIGTERM_EXIT, RunFailure, record_failure

SIGTERM_GRACE_S = 5.0  # time a rank has after SIGTERM to checkpoint and stop on its own
# Lightning's registered names of DDP with its start method (lightning.pytorch.strategies.ddp.DDPStrategy)
START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


def ddp_strategy(name: str, n_ranks: int, timeout_s: float) -> str | Strategy:
    """The strategy to give the Trainer: DDP (by name, or `auto` with several ranks) with the collective timeout
    `timeout_s`; any other name as it is."""
    if name == "auto" and n_ranks > 1:
        name = "ddp"
    if name not in START_METHODS:
        return name
    return DDPStrategy(start_method=START_METHODS[name], timeout=timedelta(seconds=timeout_s))


def is_collective_failure(err: BaseException) -> bool:
    """A collective or the rendezvous store that timed out or lost its peer (gloo: 'Timed out waiting', 'Connection
    closed by peer'; the TCP store: DistStoreError)."""
    return isinstance(err, torch.distributed.DistError) or (
        isinstance(err, RuntimeError) and any(s in str(err) for s in ("Gloo", "gloo", "Connection closed by peer",
                                                                      "Connection reset by peer", "NCCL")))


def child_ranks(trainer: pl.Trainer) -> list[Any]:
    """The rank processes this process started (plain DDP: rank 0 starts the others)."""
    launcher = trainer.strategy.launcher
    return list(launcher.procs) if isinstance(launcher, _SubprocessScriptLauncher) else []


def kill_child_ranks(trainer: pl.Trainer) -> None:
    """SIGKILL the ranks this process started: they are frozen or stuck in a collective with this one (SIGTERM
    cannot reach a stopped process)."""
    for proc in child_ranks(trainer):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def collective_failure(err: BaseException, trainer: pl.Trainer, timeout_s: float, resume_from: Path) -> RunFailure:
    """The one line for a failed collective on this rank."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # without gloo's "[.../pair.cc:534] " and advice
    return RunFailure(
        f"DDP: rank {trainer.global_rank} stopped at step {trainer.global_step}: another rank died or stopped"
        f" answering ({first[:160]}; collectives wait at most trainer.ddp_timeout_s={timeout_s:g} s); resume with"
        f" ckpt_path={resume_from}"
    )


class RankWatchdog(Callback):
    """With several ranks: after SIGTERM, give the main thread SIGTERM_GRACE_S to stop on its own (Lightning:
    interrupted.ckpt, exit 143); if it is still blocked in a collective, say so in one line (rank 0, also in
    failure.txt), kill the child ranks and exit 143 from the watchdog thread."""

    def __init__(self, run_dir: Path, grace_s: float = SIGTERM_GRACE_S) -> None:
        self.run_dir, self.grace_s = Path(run_dir), grace_s
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size < 2 or threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)  # every handled signal's number
        self._pipe = (read, write)
        threading.Thread(target=self._watch, args=(trainer, read), name="icar-rank-watchdog", daemon=True).start()

    def _watch(self, trainer: pl.Trainer, read: int) -> None:
        while True:
            data = os.read(read, 64)
            if self._pipe is None:  # teardown: training ended
                return
            if signal.SIGTERM in data:
                break
        time.sleep(self.grace_s)
        if self._pipe is None:  # the main thread stopped on its own
            return
        last = self.run_dir / "checkpoints" / "last.ckpt"
        resume = f"resume with ckpt_path={last}" if last.exists() else "no checkpoint was written yet"
        line = (f"stopped by SIGTERM at step {trainer.global_step}: rank {trainer.global_rank} was blocked"
                f" {self.grace_s:g} s in a collective with a rank that does not answer, so no checkpoint could be"
                f" written; {resume}")
        if trainer.is_global_zero:
            print(line, file=sys.stderr, flush=True)
            record_failure(self.run_dir, line)
        kill_child_ranks(trainer)
        os._exit(SIGTERM_EXIT)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._pipe is None:
            return
        read, write = self._pipe
        self._pipe = None
        signal.set_wakeup_fd(self._previous_fd)
        os.write(write, b"\0")  # wakes the watchdog, which sees that training ended
        os.close(write)  # the read end stays open for the daemon thread (one small fd per fit)
