"""The sweeper's config, registered as `hydra/sweeper=icar_optuna` when Hydra scans its plugins.

The published hydra-optuna-sweeper pins optuna<3; this one runs on the current Optuna. Hydra imports this module on
every start (composition included), so nothing here imports optuna.
"""


from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional  # no `from __future__ import annotations`: Hydra execs this module unregistered, which breaks string annotations in dataclasses

from hydra.core.config_store import ConfigStore

from icar import metrics


# Enums, so that Hydra refuses a misspelt choice at composition, naming the key and the allowed values
Direction = Enum("Direction", ["minimize", "maximize"])
SamplerName = Enum("SamplerName", ["tpe", "random", "grid"])
PrunerName = Enum("PrunerName", ["none", "median", "percentile", "successive_halving", "hyperband"])


@dataclass
class IcarOptunaSweeperConf:
    _target_: str = "hydra_plugins.icar_optuna_sweeper.sweeper.IcarOptunaSweeper"
    study_name: str = "${name}"
    storage: Optional[str] = None  # null: sqlite:///<hydra.sweep.dir>/optuna.db; postgresql://... to share a study
    direction: Direction = Direction.minimize
    objective: str = metrics.VAL_MSE  # the metric (a key of the job's returned summary) the study optimises and prunes on
    n_trials: int = 20  # the study's total: a re-run resumes and stops once the study holds this many trials
    n_jobs: int = 1  # trials launched together (run in parallel by a parallel launcher such as joblib)
    sampler: SamplerName = SamplerName.tpe
    seed: Optional[int] = None  # the sampler's seed
    sampler_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. {n_startup_trials: 5} for tpe
    pruner: PrunerName = PrunerName.none
    pruner_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. {n_startup_trials: 2, n_warmup_steps: 200}
    params: Optional[Dict[str, str]] = None  # key -> override grammar: choice(...), range(...), interval(...), tag(log, ...)
    # A worker records a heartbeat for each trial it runs every heartbeat_interval seconds (Optuna's RDB heartbeat);
    # a running trial without one for grace_period seconds (null: 2 x heartbeat_interval) is stale: its worker died.
    # It is then failed and retried, up to max_retry times, as a new trial with the same parameters that continues
    # from the stale trial's checkpoint. null heartbeat_interval: no heartbeats, a dead worker's trial stays RUNNING.
    heartbeat_interval: Optional[int] = 60
    grace_period: Optional[int] = None
    max_retry: int = 3


ConfigStore.instance().store(group="hydra/sweeper", name="icar_optuna", node=IcarOptunaSweeperConf,
                             provider="icar")
