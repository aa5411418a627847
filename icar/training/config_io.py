"""A `TrainConfig` from whatever holds one (a Hydra DictConfig, a checkpoint's plain dict) and back to plain values:
OmegaConf type-checks every key against the dataclasses of icar.config on the way in."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from icar.config import TrainConfig


def to_dataclass(cfg: DictConfig | TrainConfig | dict[str, Any]) -> TrainConfig:
    """Merge `cfg` onto the schema (type-checking every key) and return a `TrainConfig` object."""
    if isinstance(cfg, TrainConfig):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def to_plain_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (enums as strings): what W&B and config.yaml record."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore
