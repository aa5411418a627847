"""icar's Hydra sweeper on Optuna's ask-and-tell API (`hydra/sweeper=icar_optuna`; see config.py)."""
