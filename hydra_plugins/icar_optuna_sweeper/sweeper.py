"""A Hydra sweeper on Optuna's ask-and-tell API: ask a batch of trials, launch them as Hydra jobs with the configured
launcher (basic, joblib, submitit), tell Optuna how each ended.

- The study lives in `storage` (SQLite in the sweep folder by default), so re-running the same command resumes it:
  trial numbers continue and `n_trials` is the study's total. Trials left running by a sweeper that died on this
  host are run again under their own number (from their last checkpoint when they have one).
- A job that raises is told as failed and the sweep goes on; a job stopped by the pruner is told as pruned.
- Several workers (machines) may share one study through a PostgreSQL URL: the count-then-ask step is serialised
  (`icar.tuning.exclusive_ask`), so together they run exactly `n_trials` trials, each once.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
OWNER_ATTR = "sweeper"  # user attr "host:pid" of the sweeper process that asked (or adopted) the trial


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class IcarOptunaSweeper(Sweeper):
    def __init__(self, study_name: str, storage: Optional[str], direction: str, objective: str, n_trials: int,
                 n_jobs: int, sampler: str, seed: Optional[int], sampler_kwargs: dict[str, Any], pruner: str,
                 pruner_kwargs: dict[str, Any], params: Optional[dict[str, str]]) -> None:
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
        self.owner = f"{socket.gethostname()}:{os.getpid()}"

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        import optuna

        from icar import tuning

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
        study = optuna.create_study(study_name=self.study_name, storage=url, sampler=sampler, pruner=pruner,
                                    direction=self.direction, load_if_exists=True)
        study_file = sweep_dir / "optuna_study.json"
        tuning.write_study_file(study_file, url, self.study_name, self.pruner_name, self.pruner_kwargs, self.objective)
        self._check_compatible(study, space.distributions)
        n_before = len(study.get_trials(deepcopy=False))
        log.info(f"Optuna study {self.study_name!r} in {tuning.hide_password(url)}: {n_before} trials so far, "
                 f"{n_trials} in all; search space {', '.join(space.distributions)}")

        with tuning.exclusive_ask(url, self.study_name):
            orphans = self._adopt_orphans(study)
            # A fixed seed must not replay the same proposals in every worker and on every resume: offset it by
            # the trials the study holds when this sweeper first asks (counted under the lock, so workers differ).
            if self.seed is not None:
                study.sampler = tuning.build_sampler(self.sampler_name, self.seed + len(study.get_trials(deepcopy=False)),
                                                     space, **self.sampler_kwargs)
        returns: list[Sequence[JobReturn]] = []
        while True:
            with tuning.exclusive_ask(url, self.study_name):
                if orphans:
                    batch, orphans = orphans[: self.n_jobs], orphans[self.n_jobs:]
                else:
                    left = n_trials - len(study.get_trials(deepcopy=False))
                    batch = [study.ask(space.distributions) for _ in range(min(self.n_jobs, left))]
                    for trial in batch:
                        trial.set_user_attr(OWNER_ATTR, self.owner)
            if not batch:
                break
            jobs = [self._job_overrides(trial, space, sweep_dir, study_file) for trial in batch]
            try:
                self.validate_batch_is_legal(jobs)
            except Exception:
                for trial in batch:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
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

    def _adopt_orphans(self, study: "optuna.Study") -> list["optuna.Trial"]:
        """RUNNING trials whose sweeper process on this host is gone (killed, crashed), or that have no owner (a
        sweeper killed between asking and claiming; both happen under the ask lock, which the caller holds): claimed
        to be run again. Not under submitit, whose jobs outlive the sweeper that launched them."""
        import optuna

        if "submitit" in str(self.config.hydra.launcher.get("_target_", "")):
            return []
        host = socket.gethostname()
        adopted = []
        for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            owner = frozen.user_attrs.get(OWNER_ATTR)
            owner_host, _, pid = str(owner or "").rpartition(":")
            if owner is None or (owner_host == host and pid.isdigit() and not _alive(int(pid))):
                trial = optuna.Trial(study, frozen._trial_id)
                trial.set_user_attr(OWNER_ATTR, self.owner)
                adopted.append(trial)
                log.info(f"trial {frozen.number} was left running by a stopped sweeper: running it again")
        return adopted

    def _job_overrides(self, trial: "optuna.Trial", space: Any, sweep_dir: Path, study_file: Path) -> list[str]:
        from icar import tuning

        run_dir = sweep_dir / f"trial_{trial.number}"
        trial.set_user_attr("run_dir", str(run_dir))
        overrides = [*space.fixed, *(f"{k}={tuning.override_value(v)}" for k, v in trial.params.items())]
        overrides += [
            f"hydra.sweep.subdir=trial_{trial.number}",
            f"++hydra.job.env_set.{tuning.STUDY_FILE_ENV}={tuning.override_value(str(study_file))}",
            f"++hydra.job.env_set.{tuning.TRIAL_ID_ENV}={trial._trial_id}",
        ]
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():  # an interrupted trial continues where its last checkpoint left it
            overrides.append(f"ckpt_path={tuning.override_value(str(last))}")
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
