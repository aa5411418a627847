"""Sweeps that survive interruption: a grid job is identified by its config, not by its job number.

A job's folder below the sweep is named by the values it sweeps and a digest of its whole experiment config
(`model.n_layers=3,seed=0-1f2e3d4c`, the resolver `icar_job_dir` of conf/train.yaml). Re-running a sweep command into
an existing sweep folder (`hydra.sweep.dir=<old>`, or `make fig5 RESUME=<old>|last`) therefore finds each job's
earlier folder: a finished job (summary.json) is skipped and its recorded metrics returned, an interrupted one
resumes from its newest checkpoint, a job without a folder runs. A narrowed or widened grid cannot land on another
config's folder, whatever its job numbers; a changed fixed value (say `trainer.max_steps`) makes new folders.

Every invocation's `multirun.yaml` is kept (`invocations/`), since Hydra rewrites it at each start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from icar.config import ConfigError, TrainConfig
from icar.training.config_io import to_plain_dict
from icar.metrics import METRICS_FILE, SUMMARY_FILE, WANDB_ID_FILE
from icar.training.failures import FAILURE_FILE
from icar.training.resume import config_diff, is_safe, newest_checkpoint

log = logging.getLogger(__name__)
INVOCATIONS_DIR = "invocations"
# not part of a job's identity: where and under which name it runs, how it is resumed, logged and shown
NOT_IDENTITY = ("name", "run_dir", "ckpt_path", "resume_override", "logger", "hparams_search")
NAME_LIMIT = 100  # characters of swept values in a folder name (the digest keeps longer ones distinct)


def config_digest(config: dict[str, Any]) -> str:
    """8 hex digits of the experiment a job config describes (the keys of NOT_IDENTITY and the progress bar left
    out); equal configs give equal digests."""
    kept = {k: v for k, v in config.items() if k not in NOT_IDENTITY and k != "hydra"}
    trainer = dict(kept.get("trainer") or {})
    trainer.pop("enable_progress_bar", None)
    kept["trainer"] = trainer
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]


def swept_values(task_overrides: list[str], swept_keys: set[str]) -> str:
    """'model.n_layers=3,seed=0': the job's overrides of the swept keys, sorted, with characters unsafe in a folder
    name replaced."""
    chosen = sorted(o for o in task_overrides if o.partition("=")[0].lstrip("+~") in swept_keys)
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(chosen))
    return text[:NAME_LIMIT]


def swept_keys(hydra_cfg: DictConfig) -> set[str]:
    """The keys a sweep varies: those of `hydra.sweeper.params` and those swept on its command line (read from the
    `multirun.yaml` the sweeper saved)."""
    keys = {str(k).lstrip("+~") for k in (hydra_cfg.sweeper.get("params") or {})}
    saved = Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml"
    if saved.is_file():
        command_line = list(OmegaConf.load(saved).hydra.overrides.task)
        keys |= {o.get_key_element().lstrip("+~") for o in OverridesParser.create().parse_overrides(command_line)
                 if o.is_sweep_override()}
    return keys


def job_dir(*, _root_: DictConfig) -> str:
    """Resolver `icar_job_dir` (hydra.sweep.subdir of conf/train.yaml): the folder of the sweep that already holds
    this config (`*-<digest>`), else `<swept values>-<digest>`; the job number where the job's config cannot be
    seen (Hydra's config alone)."""
    hydra_cfg = _root_.get("hydra")
    if hydra_cfg is None or "model" not in _root_:
        return str(hydra_cfg.job.num) if hydra_cfg is not None else "0"
    digest = config_digest(OmegaConf.to_container(_root_, resolve=False))
    sweep_dir = Path(str(hydra_cfg.sweep.dir))
    earlier = sorted(p.name for p in sweep_dir.glob(f"*{digest}") if p.name.endswith((f"-{digest}", digest))
                     and p.is_dir())
    if earlier:
        return earlier[0]
    values = swept_values(list(hydra_cfg.overrides.task), swept_keys(hydra_cfg))
    return f"{values}-{digest}" if values else digest


class EarlierFailure(Exception):
    """A job whose earlier attempt ended failed (it diverged): the sweep records it as failed again."""


def earlier_outcome(run_dir: Path, cfg: TrainConfig) -> dict[str, float] | None:
    """For a sweep job whose folder holds an earlier attempt: its recorded metrics when it finished (the job is then
    skipped); None when it must train, with `cfg.ckpt_path` set to its newest checkpoint when it has one. An attempt
    that left no checkpoint starts over: its partial metrics and W&B id are cleared. ConfigError when the folder
    holds a run of another config (never overwritten); EarlierFailure when the earlier attempt diverged."""
    if cfg.ckpt_path or not (run_dir / "config.yaml").is_file():
        return None
    recorded = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    changed = [k for k in config_diff(recorded, to_plain_dict(cfg)) if not is_safe(k)]
    if changed:
        raise ConfigError(f"{run_dir} holds a run of another config ({', '.join(changed[:4])} differ); "
                          "it is left as it is: run this sweep into a new folder")
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        recorded_metrics = json.loads(summary.read_text())
        if recorded_metrics.get("diverged"):  # ended, but failed: fails again without training again
            failure = run_dir / FAILURE_FILE
            line = failure.read_text().strip() if failure.is_file() else "diverged"
            raise EarlierFailure(f"{run_dir.name} failed earlier: {line}")
        log.info(f"{run_dir.name}: finished earlier, skipped")
        return {k: float(v) for k, v in recorded_metrics.items() if isinstance(v, (int, float))}
    ckpt = newest_checkpoint(run_dir)
    if ckpt is not None:
        cfg.ckpt_path = str(ckpt)
        log.info(f"{run_dir.name}: interrupted earlier, resuming from {ckpt.name}")
        return None
    for stale in (METRICS_FILE, WANDB_ID_FILE):  # an attempt killed before its first checkpoint: start over
        (run_dir / stale).unlink(missing_ok=True)
    log.info(f"{run_dir.name}: an earlier attempt left no checkpoint, starting over")
    return None


class KeepInvocations(Callback):
    """Hydra rewrites SWEEP/multirun.yaml at every start: keep the earlier one as SWEEP/invocations/<n>.yaml, so a
    resumed sweep folder records every command that ran into it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        saved = Path(config.hydra.sweep.dir) / "multirun.yaml"
        if saved.is_file():
            folder = saved.parent / INVOCATIONS_DIR
            folder.mkdir(exist_ok=True)
            n = 1 + sum(1 for _ in folder.glob("*.yaml"))
            shutil.copy2(saved, folder / f"{n}.yaml")
            log.info(f"continuing sweep {saved.parent} (invocation {n + 1}): finished jobs are skipped, "
                     "interrupted ones resume")
