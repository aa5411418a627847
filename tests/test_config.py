"""Config composition and validation: typos and bad values stop before training, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from icar.config import ConfigError, DiagonalConfig, Family, TrainConfig, TransformerConfig, validate
from icar.training.config_io import to_dataclass, to_plain_dict
from tests.conftest import CONF_DIR, REPO


def test_default_config_composes_typed(make_cfg):
    """The default composition is a valid TrainConfig with enums, and matches the schema defaults where unset."""
    cfg = to_dataclass(make_cfg())
    validate(cfg)
    assert isinstance(cfg, TrainConfig)
    assert cfg.data.family == Family.orthogonal and cfg.model.n_heads == 4


def test_the_dataclasses_are_the_defaults(make_cfg):
    """`run(TrainConfig())` from Python trains what `make train` trains: the YAML adds nothing to the defaults
    but the run folder (a Hydra interpolation)."""
    composed = to_plain_dict(to_dataclass(make_cfg()))
    default = to_plain_dict(TrainConfig())
    assert {k: v for k, v in composed.items() if k != "run_dir"} == {k: v for k, v in default.items() if k != "run_dir"}


@pytest.mark.parametrize("overrides, cls, absent", [
    ([], TransformerConfig, "init_std"),
    (["model=softmax"], TransformerConfig, "pe_only"),
    (["model=diagonal"], DiagonalConfig, "n_layers"),
    (["experiment=unitary_diagonal"], DiagonalConfig, "positional"),
])
def test_each_architecture_has_its_own_model_config(make_cfg, overrides, cls, absent):
    """model=linear|softmax give a TransformerConfig, model=diagonal a DiagonalConfig; neither takes the other's keys
    (a misspelt or foreign key fails at composition) and a checkpoint's plain dict comes back as the same class."""
    cfg = to_dataclass(make_cfg(*overrides))
    assert type(cfg.model) is cls
    assert absent not in to_plain_dict(cfg)["model"]
    assert type(to_dataclass(to_plain_dict(cfg)).model) is cls
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        make_cfg(*overrides, f"model.{absent}=1")


def test_model_arch_cannot_contradict_the_model_group(make_cfg):
    with pytest.raises(ConfigError, match="model.arch=diagonal does not match"):
        validate(to_dataclass(make_cfg("model.arch=diagonal")))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.d=0"], "data.d"),
        (["data.T=1"], "data.T"),
        (["model.n_heads=0"], "model.n_heads"),
        (["data=commuting", "data.d=5"], "data.d"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-1e-3"], "optim.lr"),
        (["trainer.accelerator=cpu", "trainer.devices=4096"], "trainer.devices"),
        (["model.n_layers=0"], "model.n_layers"),
        (["data.mu=2"], "data.mu"),  # mu has no meaning for Haar W
        (["model=diagonal", "data.tokens=augmented"], "model.arch=diagonal"),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path"),
        (["data.tokens=raw", "model.d_model=7"], "model.d_model"),
        (["data.tokens=raw", "model.readout=block"], "model.readout=block"),
        (["model.d_model=30"], "model.readout=block"),  # augmented tokens read the block by default
        (["trainer.accelerator=cpuu"], "trainer.accelerator"),
        (["trainer.accelerator=cpu", "trainer.devices=2", "data.val_size=1"], "data.val_size"),
        (["trainer.num_nodes=0"], "trainer.num_nodes"),
    ],
)
def test_bad_values_fail_naming_the_key(make_cfg, overrides, key):
    """Each invalid value raises ConfigError whose one-line message names the key."""
    with pytest.raises(ConfigError) as err:
        validate(to_dataclass(make_cfg(*overrides)))
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [("model.n_hedas=2", "n_hedas"), ("data.family=fractal", "family"), ("data.d=five", "d"), ("model.attention=relu", "attention")],
)
def test_typos_and_wrong_types_fail_at_composition(make_cfg, override, key):
    """A misspelt key, an unknown choice or a wrong type fails when the config is composed."""
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as err:
        make_cfg(override)
    assert key in str(err.value) or key in str(err.value.__cause__)


def test_every_group_option_composes(make_cfg):
    """Every option of every config group composes and validates (experiments are trained in test_train)."""
    for group in ("model", "data", "trainer", "logger"):
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            overrides = [f"{group}={path.stem}"]
            if group == "trainer":
                overrides += ["trainer.accelerator=cpu", "trainer.devices=1"]
            validate(to_dataclass(make_cfg(*overrides)))


def test_cli_bad_value_is_one_clear_line(tmp_path):
    """`scripts/train.py model.n_heads=0` exits non-zero at once with a message naming model.n_heads."""
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "model.n_heads=0", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines == ["config error: model.n_heads must be >= 1, got 0"], proc.stderr


def test_configs_of_the_flat_model_config_still_load():
    """Runs saved before the architectures had their own config classes carry the other architecture's keys with
    their defaults (init_std and pe_only in a Transformer's config): their checkpoints load and resume as before,
    while a key no architecture has still fails."""
    from icar.training.resume import check_resume

    new = to_plain_dict(TrainConfig())
    old = {**new, "model": {**new["model"], "init_std": 0.1, "pe_only": False}}
    assert to_dataclass(old) == TrainConfig()
    assert check_resume(old, new, override=False) == {}
    with pytest.raises(ConfigKeyError):
        to_dataclass({**new, "model": {**new["model"], "n_layerz": 2}})
