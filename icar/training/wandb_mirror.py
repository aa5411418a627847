"""W&B as a mirror that cannot stop a run. SLURM signals every process of a job it preempts or requeues, wandb-core
(W&B's service process) included: the service dies while training runs on to the end of its step, and every W&B call
after that raises (`ConnectionResetError`). Such a failure is dropped with one warning, and W&B is left alone for the
rest of the run; metrics.jsonl stays the record, and a resumed run continues the same W&B run."""

from __future__ import annotations

import logging
from typing import Any, Callable

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


class MirrorWandbLogger(WandbLogger):
    """Lightning's WandbLogger whose calls never raise: the first failure is logged once, later calls are skipped."""

    broken: BaseException | None = None

    def mirror(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.broken is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            self.broken = err
            log.warning(f"W&B stopped mirroring this run ({type(err).__name__}: {err}); metrics.jsonl keeps the record")
            return None

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self.mirror(super().log_metrics, metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self.mirror(super().log_hyperparams, params)


def mirror(logger: Logger, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` for a W&B call made directly on `logger.experiment`: guarded when `logger` is a mirror."""
    return logger.mirror(fn, *args) if isinstance(logger, MirrorWandbLogger) else fn(*args)
