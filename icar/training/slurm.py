"""Runs as SLURM jobs: one way to stop, be requeued and come back.

A job that SLURM wants gone gets SIGTERM (preemption, `scontrol requeue`, `scancel`, the hard time limit) or, before
its time limit, the `--signal` that submitit's sbatch asks for (USR2, `hydra.launcher.signal_delay_s` seconds ahead).
Both take the path of `icar.training.guards`: Lightning stops at the next step boundary, `CheckpointOnInterrupt` writes
`checkpoints/interrupted.ckpt`, the run exits. What differs is who requeues:

- SIGTERM: SLURM itself, when it preempts or requeues the job (`scancel` does not); the run exits 143.
- USR2 (time limit, or preemption on clusters with `SlurmctldParameters=preempt_send_user_signal`): submitit, once the
  checkpoint is on disk. `RequeueOnSignal` turns the signal into SIGTERM for this process and afterwards hands it to
  submitit's own handler, which counts time-outs (`hydra.launcher.max_num_timeout`), runs `scontrol requeue` and
  resubmits the same Hydra job; the run exits 0 (`icar.training.guards.is_being_requeued`).

A restarted job (`SLURM_RESTART_COUNT` >= 1) runs the same Hydra job in the same folder; `requeued_checkpoint`
points it at the newest of its checkpoints, and the run continues there with the same W&B run (`wandb_id.txt`).

Lightning's own auto-requeue (`SLURMEnvironment(auto_requeue=True)`, the default) saves `hpc_ckpt_*.ckpt` inside the
signal handler, at whatever instruction the signal interrupts (mid-step: the optimiser or the scheduler a step apart),
so it is switched off (`cluster_plugins`); the environment is still used for the ranks SLURM starts.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from icar.training.resume import newest_checkpoint

log = logging.getLogger(__name__)

_requeue_requested = False  # set once submitit has been asked to requeue this job (read by icar.training.guards)


def in_slurm_job() -> bool:
    """Whether this process is a task of a SLURM job step (srun or sbatch), as Lightning decides: SLURM_NTASKS set
    and the job not an interactive shell (`srun --job-name=bash|interactive`)."""
    return SLURMEnvironment.detect()


def under_submitit() -> bool:
    """Whether this process runs a submitit job on SLURM (hydra/launcher=slurm)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def requeue_signal() -> signal.Signals:
    """The signal submitit's sbatch asks SLURM for before the time limit: `SUBMITIT_PREEMPT_SIGNAL` (default USR2)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def cluster_plugins() -> list[Any]:
    """Inside a SLURM job: Lightning's SLURM environment (ranks from SLURM_PROCID, SLURM_NTASKS, ...) without its
    auto-requeue handler. Elsewhere nothing (Lightning detects its environment itself)."""
    return [SLURMEnvironment(auto_requeue=False)] if in_slurm_job() else []


def requeue_requested() -> bool:
    """True once this job has asked submitit to requeue it (so its SIGTERM is expected, not a failure)."""
    return _requeue_requested


def restart_count() -> int:
    """How many times SLURM has restarted this job (requeue, preemption, node failure); 0 outside SLURM."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def requeued_checkpoint(run_dir: Path) -> str | None:
    """For a SLURM job that has been restarted: the newest checkpoint its run folder holds (`interrupted.ckpt` if
    its last attempt stopped cleanly, else `last.ckpt` from the last validation), to resume from; else None."""
    if restart_count() < 1:
        return None
    newest = newest_checkpoint(run_dir)
    if newest is None:
        return None
    log.info(f"SLURM restart {restart_count()} of job {os.environ.get('SLURM_JOB_ID')}: resuming from {newest}")
    return str(newest)


class RequeueOnSignal(Callback):
    """Under submitit: the requeue signal stops training as SIGTERM does (at a step boundary, every rank together,
    `interrupted.ckpt` written), then submitit's handler requeues the job.

    Submitit's handler alone would requeue and `sys.exit` from inside the signal handler, at an arbitrary point of a
    step; here it runs after the checkpoint. Place this callback after `CheckpointOnInterrupt`, whose `on_exception`
    writes the checkpoint.
    """

    def __init__(self) -> None:
        self.signum = requeue_signal()
        self.received = False
        self._previous: Callable | int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning has installed its SIGTERM handler (it does so just before the fit loop starts).
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning(f"received {signal.Signals(signum).name} (SLURM time limit or preemption): checkpointing at the"
                    " end of this step, then requeueing")
        self.received = True
        signal.raise_signal(signal.SIGTERM)  # Lightning's handler: stop at the next step boundary

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        global _requeue_requested
        self._restore()
        if not (self.received and isinstance(exception, SIGTERMException)):
            return
        previous = self._previous
        if not callable(previous):
            log.error("no submitit handler to requeue this job: it stops here; resume with ckpt_path=...")
            return
        try:
            previous(self.signum, None)  # submitit: count the time-out, dump the same job, scontrol requeue, exit
        except SystemExit:  # submitit asks to exit once requeued: the run does, from icar.training.run
            pass
        except Exception as err:  # e.g. UncompletedJobError: timed out more than max_num_timeout times
            log.error(f"SLURM job not requeued: {type(err).__name__}: {err}")
            return
        _requeue_requested = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and signal.getsignal(self.signum) == self._handle:
            signal.signal(self.signum, self._previous)


def requeue_callbacks() -> list[Callback]:
    """`RequeueOnSignal` for a submitit job on SLURM, nothing elsewhere."""
    return [RequeueOnSignal()] if under_submitit() and in_slurm_job() else []
