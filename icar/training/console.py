"""What a run prints: each Lightning line once, no advertisements, no warnings we cannot act on.

Lightning's `lightning` logger carries its own stderr handler and also propagates to the root logger, which Hydra
configures (console and the job's .log file): every Lightning line appeared twice. Lightning 2.6 also logs tips for
its hosted products (litlogger, litmodels) on every fit.
"""

from __future__ import annotations

import logging
import warnings

ADVERT_PREFIX = "💡 Tip:"  # lightning.pytorch.trainer.connectors.{logger,callback}_connector (Lightning 2.6)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT_PREFIX)


def quiet_lightning() -> None:
    """Print each Lightning line once (through the root handlers when something, e.g. Hydra, configured them) and
    drop Lightning's product tips. Idempotent; call after `lightning` is imported."""
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
        return  # the filters below are in place already
    rank_zero.addFilter(_DropAdverts())
    # Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) calls a torch API that torch 2.13
    # deprecates, once per fit: the call is inside Lightning, nothing here can change it.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    # Lightning warns from two places of its SLURM detection, every fit, where `srun` is on PATH: the hint once
    warnings.filterwarnings("once", message=r"The `srun` command is available on your system but is not used")
