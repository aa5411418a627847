"""A Hydra sweeper on Optuna's ask-and-tell API: ask a batch of trials, launch them as Hydra jobs with the configured
launcher (basic, joblib, submitit), tell Optuna how each ended.

- The study lives in `storage` (SQLite in the sweep folder by default), so re-running the same command resumes it:
  trial numbers continue and `n_trials` is the study's total.
- A job that raises is told as failed and the sweep goes on; a job stopped by the pruner is told as pruned.
- Several workers (machines, SLURM jobs) may share one study through a PostgreSQL URL: the count-then-ask step is
  serialised (`icar.orchestration.tuning.exclusive_ask`), so together they run exactly `n_trials` trials, each once.
- A worker that dies (SIGKILL, `scancel`, a lost node) stops the heartbeat of its trial (Optuna's RDB heartbeat,
  every `heartbeat_interval` seconds); once it is older than `grace_period`, another worker fails the trial and runs
  its retry: a new trial with the same parameters, continuing from the dead trial's checkpoint in the dead trial's
  run folder when it can reach it. A worker with nothing left to ask waits while other workers' trials run, so that
  it can take over one whose worker dies.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
OWNER_ATTR = "sweeper"  # user attr "host:pid" of the sweeper process that asked the trial (for the record)
HEARTBEAT_ATTR = "heartbeat_interval"  # user attr: the trial's worker records heartbeats (so it can go stale)


class IcarOptunaSweeper(Sweeper):
    def __init__(self, study_name: str, storage: Optional[str], direction: str, objective: str, n_trials: int,
                 n_jobs: int, sampler: str, seed: Optional[int], sampler_kwargs: dict[str, Any], pruner: str,
                 pruner_kwargs: dict[str, Any], params: Optional[dict[str, str]],
                 heartbeat_interval: Optional[int] = 60, grace_period: Optional[int] = None, max_retry: int = 3) -> None:
        direction, sampler, pruner = (getattr(v, "name", v) for v in (direction, sampler, pruner))  # enums -> str
        if n_trials < 1 or n_jobs < 1:
            raise HydraException(f"hydra.sweeper.n_trials and n_jobs must be >= 1, got {n_trials} and {n_jobs}")
        if direction not in ("minimize", "maximize"):
            raise HydraException(f"hydra.sweeper.direction must be minimize or maximize, got {direction!r}")
        self.study_name, self.storage, self.direction, self.objective = study_name, storage, direction, objective
        self.n_trials, self.n_jobs = n_trials, n_jobs
        self.sampler_name, self.seed, self.sampler_kwargs = sampler, seed, dict(sampler_kwargs)
        self.pruner_name, self.pruner_kwargs = pruner, dict(pruner_kwargs)
        self.params = dict(params or {})
        if heartbeat_interval is not None and heartbeat_interval < 1 or grace_period is not None and grace_period < 1:
            raise HydraException(f"hydra.sweeper.heartbeat_interval and grace_period must be >= 1 s or null, got "
                                 f"{heartbeat_interval} and {grace_period}")
        self.heartbeat_interval, self.grace_period, self.max_retry = heartbeat_interval, grace_period, max_retry
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        # a sweeper running as a SLURM job: which one (array task as <array id>_<index>), for the record
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        self.slurm_job = f"{array[0]}_{array[1]}" if all(array) else os.environ.get("SLURM_JOB_ID")

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        import optuna

        from icar.orchestration import tuning

        sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        try:
            space = tuning.parse_search_space(self.params, arguments)
            if not space.distributions:
                raise tuning.SearchSpaceError("nothing to search: give hydra.sweeper.params (an hparams_search "
                                              "preset) or a sweep on the command line, e.g. optim.lr='interval(1e-3,1e-1)'")
            sampler = tuning.build_sampler(self.sampler_name, self.seed, space, **self.sampler_kwargs)
            pruner = tuning.build_pruner(self.pruner_name, **self.pruner_kwargs)
        except tuning.SearchSpaceError as err:
            raise HydraException(str(err)) from None
        n_trials = self.n_trials
        if self.sampler_name == "grid":
            n_trials = min(n_trials, math.prod(len(v) for v in space.grid().values()))
        url = tuning.storage_url(self.storage, sweep_dir)
        # one worker at a time: workers started together on a fresh database race to create Optuna's tables
        # (PostgreSQL: "duplicate key value violates unique constraint pg_type_typname_nsp_index")
        with tuning.exclusive_ask(url, "icar: optuna schema"):
            storage = tuning.build_storage(url, self.heartbeat_interval, self.grace_period, self.max_retry)
            study = optuna.create_study(study_name=self.study_name, storage=storage, sampler=sampler, pruner=pruner,
                                        direction=self.direction, load_if_exists=True)
        study_file = sweep_dir / "optuna_study.json"
        tuning.write_study_file(study_file, url, self.study_name, self.pruner_name, self.pruner_kwargs, self.objective,
                                self.heartbeat_interval)
        self._check_compatible(study, space.distributions)
        n_before = len(study.get_trials(deepcopy=False))
        log.info(f"Optuna study {self.study_name!r} in {tuning.hide_password(url)}: {n_before} trials so far, "
                 f"{n_trials} in all; search space {', '.join(space.distributions)}")

        if self.seed is not None:
            with tuning.exclusive_ask(url, self.study_name):
                # A fixed seed must not replay the same proposals in every worker and on every resume: offset it by
                # the trials the study holds when this sweeper first asks (counted under the lock, so workers differ).
                study.sampler = tuning.build_sampler(self.sampler_name, self.seed + len(study.get_trials(deepcopy=False)),
                                                     space, **self.sampler_kwargs)
        returns: list[Sequence[JobReturn]] = []
        while True:
            with tuning.exclusive_ask(url, self.study_name):
                batch, others_running = self._ask(study, storage, space, n_trials)
            batch = [trial for trial in batch if not self._tell_finished_run(study, trial, sweep_dir)]
            if not batch:
                if not others_running:
                    break
                # other workers' trials run: look again soon, to take over any whose worker dies or to end with them
                time.sleep(min(self.heartbeat_interval, 5))
                continue
            jobs = [self._job_overrides(trial, space, sweep_dir, study_file) for trial in batch]
            try:
                self.validate_batch_is_legal(jobs)
            except Exception:
                for trial in batch:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            with tuning.heartbeat(storage, [trial._trial_id for trial in batch]):
                results = self.launcher.launch(jobs, initial_job_idx=batch[0].number)
            for trial, result in zip(batch, results):
                self._tell(study, trial, result)
            returns.append(results)
        self._write_results(study, sweep_dir)
        return returns

    @staticmethod
    def _check_compatible(study: "optuna.Study", distributions: dict[str, Any]) -> None:
        """Refuse, before asking, a search space the study's earlier trials rule out (Optuna lets a numeric range
        change within a study, not a choice's values or a parameter's kind)."""
        from optuna.distributions import check_distribution_compatibility

        seen: dict[str, Any] = {}
        for frozen in study.get_trials(deepcopy=False):
            seen.update(frozen.distributions)
        for key, dist in distributions.items():
            if key in seen:
                try:
                    check_distribution_compatibility(seen[key], dist)
                except ValueError as err:
                    raise HydraException(
                        f"{key}: the study {study.study_name!r} searched {seen[key]} before, now {dist} ({err}); "
                        "keep the search space or start a new study (hydra.sweeper.study_name=...)") from None

    def _ask(self, study: "optuna.Study", storage: Any, space: Any,
             n_trials: int) -> tuple[list["optuna.Trial"], bool]:
        """Under the ask lock: fail the trials whose heartbeat went stale (each gets a WAITING retry), then ask the
        retries and new trials up to the study's n_trials. Returns the batch and whether trials of other workers
        that keep heartbeats are still running."""
        import optuna

        from icar.orchestration import tuning

        batch = []
        with warnings.catch_warnings():  # heartbeats are "experimental" and "supposed to be used with Study.optimize"
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            for _ in range(tuning.trials_to_ask(trials, n_trials, self.n_jobs)):
                batch.append(study.ask(space.distributions))
        for trial in batch:
            if self.heartbeat_interval is not None:
                storage.record_heartbeat(trial._trial_id)  # at once: a trial without any heartbeat never goes stale
                trial.set_user_attr(HEARTBEAT_ATTR, self.heartbeat_interval)
            trial.set_user_attr(OWNER_ATTR, self.owner)
            if self.slurm_job or "slurm_job" in trial.user_attrs:  # (a retry carries the stale trial's)
                trial.set_user_attr("slurm_job", self.slurm_job)
        running = optuna.trial.TrialState.RUNNING
        others = self.heartbeat_interval is not None and any(
            t.state == running and HEARTBEAT_ATTR in t.user_attrs for t in trials)
        return batch, others

    def _tell_finished_run(self, study: "optuna.Study", trial: "optuna.Trial", sweep_dir: Path) -> bool:
        """A retry whose stale trial's run did finish (its sweeper died while the job ran on, as a submitit job does):
        tell the retry the run's result from its summary.json instead of running it again. Returns whether told."""
        import json

        stale_dir = trial.user_attrs.get("run_dir")
        summary = Path(stale_dir) / "summary.json" if stale_dir and Path(stale_dir).parent == sweep_dir else None
        if summary is None or not summary.is_file():
            return False
        value = json.loads(summary.read_text()).get(self.objective)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        trial.set_user_attr("run_dir", stale_dir)
        study.tell(trial, float(value))
        log.info(f"trial {trial.number}: the run of the stale trial it retries had finished ({stale_dir}); "
                 f"{self.objective}={value:.4g} from its summary.json")
        return True

    def _job_overrides(self, trial: "optuna.Trial", space: Any, sweep_dir: Path, study_file: Path) -> list[str]:
        from icar.orchestration import tuning
        from icar.training.resume import newest_checkpoint

        run_dir = sweep_dir / f"trial_{trial.number}"
        ckpt = None
        stale_dir = trial.user_attrs.get("run_dir")  # a retry carries the user attrs of the stale trial it retries
        if stale_dir and Path(stale_dir).parent == sweep_dir:
            ckpt = newest_checkpoint(Path(stale_dir))
            if ckpt is not None:  # continue the dead worker's run in its folder, from its checkpoint
                run_dir = Path(stale_dir)
                log.info(f"trial {trial.number} retries a trial whose worker died: continuing {run_dir} from {ckpt.name}")
        trial.set_user_attr("run_dir", str(run_dir))
        overrides = [*space.fixed, *(f"{k}={tuning.override_value(v)}" for k, v in trial.params.items())]
        overrides += [
            f"hydra.sweep.subdir={run_dir.name}",
            f"++hydra.job.env_set.{tuning.STUDY_FILE_ENV}={tuning.override_value(str(study_file))}",
            f"++hydra.job.env_set.{tuning.TRIAL_ID_ENV}={trial._trial_id}",
        ]
        if ckpt is not None:
            overrides.append(f"ckpt_path={tuning.override_value(str(ckpt))}")
        log.info(f"trial {trial.number}: {' '.join(f'{k}={v}' for k, v in trial.params.items())}")
        return overrides

    def _tell(self, study: "optuna.Study", trial: "optuna.Trial", result: JobReturn) -> None:
        import optuna

        state = optuna.trial.TrialState
        if result.status != JobStatus.COMPLETED:
            err = result._return_value  # the job's exception (`return_value` would re-raise it)
            # under ddp_spawn a rank's TrialPruned reaches here wrapped in torch's ProcessRaisedException
            if isinstance(err, optuna.TrialPruned) or "optuna.exceptions.TrialPruned" in str(err):
                study.tell(trial, state=state.PRUNED)
                log.info(f"trial {trial.number} pruned: {str(err).strip().splitlines()[-1]}")
            else:  # a failing trial is recorded; the search goes on
                trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
                study.tell(trial, state=state.FAIL)
                log.warning(f"trial {trial.number} failed ({type(err).__name__}: {err}); the search goes on")
            return
        value = result.return_value
        if isinstance(value, dict):
            value = value.get(self.objective)
        if value is None or not math.isfinite(float(value)):
            trial.set_user_attr("error", f"objective {self.objective} is {value}")
            study.tell(trial, state=state.FAIL)
            log.warning(f"trial {trial.number}: no finite {self.objective} ({value}); recorded as failed")
            return
        study.tell(trial, float(value))
        log.info(f"trial {trial.number}: {self.objective}={float(value):.4g} (best {study.best_value:.4g}, "
                 f"trial {study.best_trial.number})")

    def _write_results(self, study: "optuna.Study", sweep_dir: Path) -> None:
        """SWEEP/optuna_results.yaml: the best trial and the count of trials by state."""
        trials = study.get_trials(deepcopy=False)
        states = {s: sum(t.state.name == s for t in trials) for s in sorted({t.state.name for t in trials})}
        results: dict[str, Any] = {"study_name": self.study_name, "direction": self.direction,
                                   "objective": self.objective, "n_trials": len(trials), "states": states}
        completed = [t for t in trials if t.state.name == "COMPLETE"]
        if completed:
            best = study.best_trial
            results.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                           best_run_dir=best.user_attrs.get("run_dir"))
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optuna_results.yaml")
        log.info(f"study {self.study_name!r}: {len(trials)} trials {states}"
                 + (f"; best {self.objective}={results['best_value']:.4g} (trial {results['best_trial']})"
                    if completed else ""))
