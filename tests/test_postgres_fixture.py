"""The `postgres_url` fixture (tests/postgres.py) serves a real PostgreSQL, on which processes share an Optuna study."""

from __future__ import annotations

import subprocess
import sys
import uuid

import optuna
import sqlalchemy

# One worker process: load the study and run `n` ask/tell trials on it.
WORKER = """
import sys
import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)
url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
study = optuna.load_study(study_name=name, storage=url)
for _ in range(n):
    trial = study.ask()
    x = trial.suggest_float("x", -1.0, 1.0)
    study.tell(trial, x * x)
"""


def test_server_is_real_postgres(postgres_url: str):
    engine = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            version = conn.execute(sqlalchemy.text("select version()")).scalar_one()
            addr = conn.execute(sqlalchemy.text("select host(inet_server_addr())")).scalar_one()
    finally:
        engine.dispose()
    assert "PostgreSQL" in version
    assert addr == "127.0.0.1"


def test_optuna_study_shared_by_two_processes(postgres_url: str):
    name = f"fixture-{uuid.uuid4().hex[:8]}"
    optuna.create_study(storage=postgres_url, study_name=name, direction="minimize")

    # Two separate interpreters on the same study at once: 2 + 1 trials.
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, postgres_url, name, str(n)], stderr=subprocess.PIPE, text=True)
        for n in (2, 1)
    ]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err

    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert len({t._trial_id for t in trials}) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(t.value == t.params["x"] ** 2 for t in trials)
