"""A `TrainConfig` from whatever holds one (a Hydra DictConfig, a checkpoint's plain dict) and back to plain values:
OmegaConf type-checks every key against the dataclasses of icar.config on the way in."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from icar.config import MODEL_CONFIGS, Arch, ModelConfig, TrainConfig


def schema() -> DictConfig:
    """The schema with the architecture left open: `model` is typed by the shared `ModelConfig`, and merging a
    `TransformerConfig` or a `DiagonalConfig` into it (conf/model/*.yaml do) gives the node that type."""
    return OmegaConf.structured(TrainConfig(model=ModelConfig()))


def model_class(cfg: DictConfig | dict[str, Any]) -> type[ModelConfig]:
    """The model config class of `cfg`: its model node's own type when it has one (a composed Hydra config), else
    the class of its `model.arch` (a plain dict, e.g. a checkpoint's hyperparameters); the transformer by default."""
    node = cfg.get("model") if isinstance(cfg, (DictConfig, dict)) else None
    if isinstance(node, DictConfig):
        typed = OmegaConf.get_type(node)
        if isinstance(typed, type) and issubclass(typed, ModelConfig) and typed is not ModelConfig:
            return typed
    arch = node.get("arch") if node is not None else None
    return MODEL_CONFIGS[Arch(arch)] if arch is not None else MODEL_CONFIGS[Arch.transformer]


def other_architectures_keys(cls: type[ModelConfig]) -> set[str]:
    """Keys that only the other architectures' configs have: a config saved before the architectures had their own
    classes (one flat model config, up to icar of 2026-12-04) carries them with their defaults."""
    own = {f.name for f in fields(cls)}
    return {f.name for other in MODEL_CONFIGS.values() for f in fields(other)} - own


def to_dataclass(cfg: DictConfig | TrainConfig | dict[str, Any]) -> TrainConfig:
    """Merge `cfg` onto the schema of its architecture (type-checking every key) and return a `TrainConfig`. A plain
    dict (a checkpoint's hyperparameters, a run's config.yaml) may come from the flat model config of older runs:
    the other architecture's keys are dropped from it, any other unknown key still fails."""
    if isinstance(cfg, TrainConfig):
        return cfg
    cls = model_class(cfg)
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        foreign = other_architectures_keys(cls)
        cfg = {**cfg, "model": {k: v for k, v in cfg["model"].items() if k not in foreign}}
    typed = OmegaConf.merge(schema(), {"model": OmegaConf.structured(cls)})
    return OmegaConf.to_object(OmegaConf.merge(typed, cfg))  # type: ignore[return-value]


def to_plain_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (enums as strings): what W&B and config.yaml record."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore
