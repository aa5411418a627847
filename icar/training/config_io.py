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
    """The model config class of `cfg`: its model node's own type when it has one (a composed Hydra config, a
    dataclass), else the class of its `model.arch` (a plain dict, e.g. a checkpoint's hyperparameters or a loaded
    config.yaml); the transformer by default."""
    node = cfg.get("model")
    if isinstance(node, ModelConfig) and type(node) is not ModelConfig:
        return type(node)
    if isinstance(node, DictConfig):
        typed = OmegaConf.get_type(node)
        if isinstance(typed, type) and issubclass(typed, ModelConfig) and typed is not ModelConfig:
            return typed
    arch = node.get("arch") if isinstance(node, (dict, DictConfig)) else None
    return MODEL_CONFIGS[Arch(arch)] if arch is not None else MODEL_CONFIGS[Arch.transformer]


FLAT_MODEL_KEYS = frozenset(f.name for cls in MODEL_CONFIGS.values() for f in fields(cls))  # icar up to 2026-12-04


def without_flat_leftovers(model: dict[str, Any], cls: type[ModelConfig]) -> dict[str, Any]:
    """A model config saved before the architectures had their own classes holds every key of both (the flat
    layout): keep only `cls`'s. Any other dict is left as it is, so a foreign key still fails."""
    if not FLAT_MODEL_KEYS <= set(model):
        return model
    own = {f.name for f in fields(cls)}
    return {k: v for k, v in model.items() if k in own}


def to_dataclass(cfg: DictConfig | TrainConfig | dict[str, Any]) -> TrainConfig:
    """Merge `cfg` onto the schema of its architecture (type-checking every key) and return a `TrainConfig`. A plain
    dict or an untyped DictConfig (a checkpoint's hyperparameters, a loaded config.yaml) may hold the flat model
    config of older runs: its other architecture's keys are dropped."""
    if isinstance(cfg, TrainConfig):
        return cfg
    cls = model_class(cfg)
    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg.get("model")) in (dict, None):
        cfg = OmegaConf.to_container(cfg)  # untyped: read as a plain dict
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        cfg = {**cfg, "model": without_flat_leftovers(dict(cfg["model"]), cls)}
    typed = OmegaConf.merge(schema(), {"model": OmegaConf.structured(cls)})
    return OmegaConf.to_object(OmegaConf.merge(typed, cfg))  # type: ignore[return-value]


def to_plain_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (enums as strings): what W&B and config.yaml record."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore
