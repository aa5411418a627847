"""Optuna glue shared by the Hydra sweeper (`hydra_plugins/icar_optuna_sweeper`) and the training jobs it launches:
the search space from Hydra's override grammar, samplers and pruners by name, an exclusive "ask" across workers,
and the pruning callback a job adds when it runs as a trial.

A job learns that it is a trial from two environment variables the sweeper sets with `hydra.job.env_set`:
ICAR_OPTUNA_STUDY_FILE (a JSON file: storage URL, study name, pruner, monitored metric) and ICAR_OPTUNA_TRIAL_ID.
Optuna does not store the pruner in the study, so the job rebuilds it from that file.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
import warnings
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import lightning.pytorch as pl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from lightning.pytorch.callbacks import Callback

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

STUDY_FILE_ENV = "ICAR_OPTUNA_STUDY_FILE"
TRIAL_ID_ENV = "ICAR_OPTUNA_TRIAL_ID"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")


class SearchSpaceError(ValueError):
    """A search-space entry the sampler cannot use (e.g. an interval with the grid sampler)."""


@dataclass
class SearchSpace:
    """Swept keys as Optuna distributions, fixed keys as override strings to pass through unchanged."""

    distributions: dict[str, "optuna.distributions.BaseDistribution"]
    fixed: list[str]

    def grid(self) -> dict[str, list[Any]]:
        """Every swept key's values, for the grid sampler (intervals have none)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        grid: dict[str, list[Any]] = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif isinstance(dist, IntDistribution):
                grid[key] = list(range(dist.low, dist.high + 1, dist.step))
            elif isinstance(dist, FloatDistribution) and dist.step is not None:
                n = int(round((dist.high - dist.low) / dist.step))
                grid[key] = [dist.low + i * dist.step for i in range(n + 1)]
            else:
                raise SearchSpaceError(f"the grid sampler needs listed values: {key} is an interval; use choice() "
                                       "or range(), or sampler=tpe/random")
        return grid


def _distribution(override: Override) -> "optuna.distributions.BaseDistribution":
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=lambda v: v)))
    if isinstance(value, RangeSweep):
        if value.shuffle:
            raise SearchSpaceError(f"{key}: shuffle(range(...)) means nothing to a sampler; drop shuffle")
        values = list(override.sweep_iterator(transformer=lambda v: v))
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(values[0], values[-1], step=value.step)
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if "int" in value.tags:  # interval() bounds parse as floats: tag(int, ...) asks for integers
            return IntDistribution(int(value.start), int(value.end), log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise SearchSpaceError(f"{key}: unsupported sweep {override.get_value_element_as_str()} (use choice, range, "
                           "interval, tag(log, interval(...)))")


def parse_search_space(params: dict[str, str] | None, arguments: list[str]) -> SearchSpace:
    """`params` (the sweeper config: key -> override value) then the command line's overrides, in Hydra's grammar:
    `a=1,2` or `choice(1,2)`, `range(1,5)`, `interval(0.1,1)`, `tag(log, interval(1e-4,1e-1))`, `tag(int, ...)`.
    A later entry for the same key wins, so the command line refines a preset."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    overrides = OverridesParser.create().parse_overrides(lines)
    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in overrides:
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            distributions[key] = _distribution(override)
        else:
            fixed[key] = override.input_line
    return SearchSpace(distributions, list(fixed.values()))


def override_value(value: Any) -> str:
    """A sampled value written back in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and any(c in value for c in " ,()[]{}:='\"\\"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def build_sampler(name: str, seed: int | None, space: SearchSpace, **kwargs: Any) -> "optuna.samplers.BaseSampler":
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """GridSampler calls `study.stop()` once the grid is used up, which raises outside `study.optimize`; the
        sweeper caps `n_trials` at the grid's size instead."""

        def after_trial(self, *args: Any, **kwargs: Any) -> None:
            pass

    samplers = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "grid": lambda **kw: AskTellGridSampler(space.grid(), **kw),
    }
    if name not in samplers:
        raise SearchSpaceError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    try:
        return samplers[name](seed=seed, **kwargs)
    except TypeError as err:
        raise SearchSpaceError(f"hydra.sweeper.sampler_kwargs {kwargs} do not fit sampler={name} ({err})") from None


def build_pruner(name: str, **kwargs: Any) -> "optuna.pruners.BasePruner":
    import optuna

    pruners = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }
    if name not in pruners:
        raise SearchSpaceError(f"pruner must be one of {', '.join(PRUNERS)}, got {name!r}")
    try:
        return pruners[name](**kwargs)
    except TypeError as err:
        raise SearchSpaceError(f"hydra.sweeper.pruner_kwargs {kwargs} do not fit pruner={name} ({err})") from None


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The study's storage: the given URL, or a SQLite file in the sweep folder."""
    return storage or f"sqlite:///{(Path(sweep_dir) / 'optuna.db').absolute()}"


@contextlib.contextmanager
def exclusive_ask(url: str, study_name: str) -> Iterator[None]:
    """Serialise "count the trials, then ask" across every worker of a study, so that workers sharing it never
    create more than `n_trials` between them: a PostgreSQL advisory lock, or a file lock beside a SQLite file."""
    if url.startswith("postgresql"):
        import sqlalchemy

        key = zlib.crc32(study_name.encode())
        # autocommit: no transaction left idle while the lock is held (idle_in_transaction_session_timeout)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
    elif url.startswith("sqlite:///"):
        with open(url.removeprefix("sqlite:///") + f".{zlib.crc32(study_name.encode()):08x}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    else:  # another RDB: asks are not serialised, so workers sharing it may overshoot n_trials by a few
        yield


def build_storage(url: str, heartbeat_interval: int | None, grace_period: int | None,
                  max_retry: int) -> "optuna.storages.RDBStorage":
    """The study's RDB storage with Optuna's heartbeat: a RUNNING trial whose worker has not recorded a heartbeat for
    `grace_period` seconds is failed by `optuna.storages.fail_stale_trials` and retried up to `max_retry` times as a
    WAITING copy (same parameters), which the next `ask` of any worker takes."""
    import optuna

    if heartbeat_interval is None:
        return optuna.storages.RDBStorage(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=max_retry, inherit_intermediate_values=True))


@contextlib.contextmanager
def heartbeat(storage: Any, trial_ids: list[int]) -> Iterator[None]:
    """Record a heartbeat for each of `trial_ids` now and every heartbeat interval until the block ends (a daemon
    thread: a worker that dies, however, stops beating and its trials go stale)."""
    interval = getattr(storage, "heartbeat_interval", None)
    if interval is None or not trial_ids:
        yield
        return
    for trial_id in trial_ids:
        storage.record_heartbeat(trial_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            for trial_id in trial_ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception as err:  # a database hiccup: the next beat tries again
                    log.warning(f"heartbeat of trial id {trial_id} failed: {err}")

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def retried_numbers(trials: list["optuna.trial.FrozenTrial"]) -> set[int]:
    """Numbers of the stale trials that have been retried (they do not count towards n_trials: their retry does)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def trials_to_ask(trials: list["optuna.trial.FrozenTrial"], n_trials: int, n_jobs: int) -> int:
    """How many trials a worker asks next: the retries waiting to run, then new ones up to the study's n_trials
    (a retried stale trial is not counted, its retry is), at most n_jobs."""
    from optuna.trial import TrialState

    counted = [t for t in trials if t.number not in retried_numbers(trials)]
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return min(n_jobs, waiting + max(0, n_trials - len(counted)))


def hide_password(url: str) -> str:
    """A storage URL fit for logs."""
    if "://" not in url or url.startswith("sqlite"):
        return url
    import sqlalchemy

    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


class OptunaPruning(Callback):
    """Reports the monitored metric to the trial after every validation, at the global step, and stops the run
    with `optuna.TrialPruned` when the pruner says so.

    Written here rather than taken from optuna-integration: its callback reports at `current_epoch`, and an icar run
    is a single epoch of `max_steps` steps, so every report would land on step 0. Under DDP rank 0 asks the pruner
    and broadcasts the decision, so that every rank stops together.
    """

    def __init__(self, trial: "optuna.trial.Trial", monitor: str) -> None:
        self.trial = trial
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import optuna

        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        prune = False
        if trainer.is_global_zero:
            self.trial.report(float(trainer.callback_metrics[self.monitor]), step=trainer.global_step)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune):
            raise optuna.TrialPruned(f"pruned at step {trainer.global_step} ({self.monitor})")


def write_study_file(path: Path, url: str, study_name: str, pruner: str, pruner_kwargs: dict[str, Any],
                     monitor: str, heartbeat_interval: int | None = None) -> None:
    path.write_text(json.dumps({"storage": url, "study_name": study_name, "pruner": pruner,
                                "pruner_kwargs": pruner_kwargs, "monitor": monitor,
                                "heartbeat_interval": heartbeat_interval}, indent=2) + "\n")
    path.chmod(0o600)  # the storage URL may hold a database password


class TrialHeartbeat(Callback):
    """The job keeps its own trial's heartbeat while it trains: under submitit its SLURM job outlives a sweeper that
    dies, and its trial must not be retried while it still runs."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self._beat: contextlib.ExitStack | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._beat = contextlib.ExitStack()
            self._beat.enter_context(heartbeat(self.storage, [self.trial_id]))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._beat is not None:
            self._beat.close()
            self._beat = None


def trial_callbacks() -> list[Callback]:
    """When this process runs an Optuna trial of the icar sweeper: its heartbeat, and the pruning callback unless the
    pruner is none; nothing otherwise."""
    study_file, trial_id = os.environ.get(STUDY_FILE_ENV), os.environ.get(TRIAL_ID_ENV)
    if not study_file or not trial_id:
        return []
    import optuna

    spec = json.loads(Path(study_file).read_text())
    callbacks: list[Callback] = []
    if spec.get("heartbeat_interval"):
        storage = build_storage(spec["storage"], spec["heartbeat_interval"], None, 0)
        callbacks.append(TrialHeartbeat(storage, int(trial_id)))
    if spec["pruner"] != "none":
        study = optuna.load_study(study_name=spec["study_name"], storage=spec["storage"],
                                  pruner=build_pruner(spec["pruner"], **spec["pruner_kwargs"]))
        callbacks.append(OptunaPruning(optuna.Trial(study, int(trial_id)), spec["monitor"]))
    return callbacks
