"""A run's loggers: the JSONL metrics file (the record, read by later analysis) and W&B (the mirror), online only
with a key and a reachable server."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from icar import metrics
from icar.config import LoggerConfig, LoggerKind
from icar.training.wandb_mirror import MirrorWandbLogger, mirror
from icar.training.wandb_mode import checked_wandb_mode, wandb_mode

log = logging.getLogger(__name__)

METRICS_FILE = metrics.METRICS_FILE


def _plain(value: Any) -> Any:
    """A JSON value: tensors as numbers or lists, a non-finite number as null (strict JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.detach().cpu().tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class JsonlLogger(Logger):
    """Appends one JSON object per `log_metrics` call to `<run_dir>/metrics.jsonl`, flushed at once.

    Lightning's CSVLogger cannot hold a curve (`val/mse_by_pos`) and buffers rows until it flushes; a JSON line per
    event keeps vectors and survives an interrupted run. Resumed runs append to the same file.
    """

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self.path = Path(run_dir) / METRICS_FILE

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The config is saved as config.yaml by `icar.training.run.train`; nothing to add here."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order."""
    with (Path(run_dir) / METRICS_FILE).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def build_loggers(cfg: LoggerConfig, run_dir: str | Path, run_name: str, config: dict[str, Any]) -> list[Logger]:
    """The JSONL record always; W&B or CSV as the mirror."""
    loggers: list[Logger] = [JsonlLogger(run_dir)]
    if cfg.kind == LoggerKind.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    elif cfg.kind == LoggerKind.wandb:
        import wandb

        mode = checked_wandb_mode(cfg, run_dir) if rank_zero_only.rank == 0 else wandb_mode(cfg)
        id_file = Path(run_dir) / metrics.WANDB_ID_FILE  # a resumed run continues the same W&B run
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        if rank_zero_only.rank == 0:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)
        wandb_logger = MirrorWandbLogger(  # W&B failures (a job's SIGTERM kills its service) never stop the run
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            name=run_name,
            id=run_id,
            resume="allow",
            save_dir=str(run_dir),
            config=config,
            settings=wandb.Settings(mode=mode, init_timeout=60, silent=True),
        )
        # Lightning 2.6 always passes anonymous=None to wandb.init, and wandb 0.31 warns that the setting "has no
        # effect" whenever it is passed at all (wandb_settings.validate_anonymous); leaving it out means the same.
        wandb_logger._wandb_init.pop("anonymous", None)
        loggers.append(wandb_logger)
    return loggers


def log_curves(loggers: list[Logger], step: int, xs: list[int], curves: dict[str, torch.Tensor], title: str) -> None:
    """Log named curves over positions: as lists in the JSONL record, as one line plot in W&B."""
    for logger in loggers:
        if isinstance(logger, JsonlLogger):
            logger.log_metrics({name: ys for name, ys in curves.items()}, step=step)
        elif isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            import wandb

            names = list(curves)
            plot = wandb.plot.line_series(
                xs=xs, ys=[curves[n].tolist() for n in names], keys=names, title=title, xname="position t"
            )
            mirror(logger, logger.experiment.log, {title: plot, metrics.WANDB_STEP: step})


def log_analysis(
    loggers: list[Logger], scalars: dict[str, float], figures: dict[str, list[Path]], step: int, summary: bool = True
) -> None:
    """Analysis numbers and figures under `analysis/`: numbers in the JSONL record; in W&B as images and, at the
    end of training, as summary values."""
    scalars = {metrics.analysis(name): value for name, value in scalars.items()}
    for logger in loggers:
        if isinstance(logger, JsonlLogger):
            logger.log_metrics(scalars, step=step)
        elif isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            import wandb

            images = {
                metrics.analysis(name): wandb.Image(str(path))
                for name, paths in figures.items()
                for path in paths
                if path.suffix == ".png"
            }
            mirror(logger, logger.experiment.log, {**images, **scalars, metrics.WANDB_STEP: step})
            if summary:
                mirror(logger, logger.experiment.summary.update, scalars)
