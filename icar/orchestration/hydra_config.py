"""Hydra's side of the config: the schema registered under `train_schema` (the dataclasses of icar.config, the
model's architecture left to the `model` group), the architectures' schemas that conf/model/*.yaml extend, and the
resolvers that conf/ and sweeps/ use for run folders, launch ids and device counts."""

from __future__ import annotations

import os

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from icar.config import DiagonalConfig, Fig4Config, TransformerConfig
from icar.orchestration.resumable import job_dir
from icar.training.config_io import schema


def launch_id() -> str:
    """This launch's id, shared by the processes it starts (DDP ranks, sweep workers inherit the environment): it
    makes folders named to the second unique when two launches start in the same second."""
    return os.environ.setdefault("ICAR_LAUNCH_ID", str(os.getpid()))


def _resumed_run(ckpt_path: str | None) -> str | None:
    if ckpt_path:
        ckpt = os.path.abspath(ckpt_path)
        if os.path.basename(os.path.dirname(ckpt)) == "checkpoints":
            return os.path.dirname(os.path.dirname(ckpt))
    return None


def run_dir_for(ckpt_path: str | None, default: str) -> str:
    """Hydra's output folder: for a resumed run (ckpt_path=RUN/checkpoints/x.ckpt) RUN/resumes/<time>-<id>, so that
    the original's `.hydra/` stays as it was; others get `default`-<launch id>."""
    run = _resumed_run(ckpt_path)
    if run is not None:
        return os.path.join(run, "resumes", f"{os.path.basename(default)}-{launch_id()}")
    return f"{default}-{launch_id()}"


def run_root_for(ckpt_path: str | None, output_dir: str) -> str:
    """The run folder: a resumed run continues in RUN, others use Hydra's output folder."""
    return _resumed_run(ckpt_path) or output_dir


def gpu_count() -> int:
    """GPUs visible to this process, at least 1 (conf/hydra/launcher/gpus.yaml: one parallel job per GPU)."""
    return max(torch.cuda.device_count(), 1)


def slurm_gpus(accelerator: str, devices: int) -> int | None:
    """GPUs per node a SLURM job asks for (hydra/launcher/slurm.yaml): one per device, none for a CPU run (a
    `--gpus-per-node` on a cluster without GPUs is refused at submission)."""
    return None if str(accelerator) == "cpu" else int(devices)


def register_configs() -> None:
    """Register the schemas (`train_schema`, `fig4_schema`) with Hydra and the resolvers of conf/: `icar_run_dir`, `icar_run_root`,
    `icar_launch_id` (train.yaml, sweeps/), `icar_gpu_count` (hydra/launcher/gpus.yaml) and `icar_slurm_gpus`
    (hydra/launcher/slurm.yaml)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=schema())
    store.store(group="model", name="transformer_schema", node=TransformerConfig)  # conf/model/linear.yaml, softmax
    store.store(group="model", name="diagonal_schema", node=DiagonalConfig)  # conf/model/diagonal.yaml
    store.store(name="fig4_schema", node=Fig4Config)  # conf/fig4.yaml
    OmegaConf.register_new_resolver("icar_run_dir", run_dir_for, replace=True)
    OmegaConf.register_new_resolver("icar_run_root", run_root_for, replace=True)
    OmegaConf.register_new_resolver("icar_launch_id", launch_id, replace=True)
    OmegaConf.register_new_resolver("icar_job_dir", job_dir, replace=True)
    OmegaConf.register_new_resolver("icar_gpu_count", gpu_count, replace=True)
    OmegaConf.register_new_resolver("icar_slurm_gpus", slurm_gpus, replace=True)
