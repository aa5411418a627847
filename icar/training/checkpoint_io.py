"""Checkpoints written atomically (a temporary file, then a rename: a reader never meets a half-written one) and
read back with one line of error instead of a traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from icar.training.failures import RunFailure


class CheckpointError(RunFailure):
    """A checkpoint that cannot be written or read."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into `.NAME.tmp` beside the target, fsync, then `os.replace`. Lightning's own save writes the
    target in place, so a full disk or a kill mid-write leaves a truncated file under the final name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}") from err
            raise


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path` (on the CPU), or CheckpointError naming the file and what is wrong with it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own files: configs, enums, optimiser
    except Exception as err:  # truncated, garbage, not a torch file: torch raises many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"ckpt_path={path} is not a readable checkpoint (truncated or not one): {first[:160]}")
    missing = [k for k in ("state_dict", "global_step", "hyper_parameters") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"ckpt_path={path} is not an icar checkpoint: it lacks {', '.join(missing)}")
    return ckpt
