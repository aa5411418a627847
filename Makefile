# icar: `make train` runs the default experiment, `make test` the tests; both install what they need in .venv.
PYTHON ?= python3
VENV ?= .venv
# constraints.txt pins torch to 2.13.0 (the CPU wheel of this project's machines). With a CUDA build of torch
# already in $(VENV): make install CONSTRAINTS=constraints-gpu.txt (the same pins, torch left alone).
CONSTRAINTS ?= constraints.txt
ARGS ?=
# Sweeps: SCALE=quick runs sweeps/<name>_quick.yaml (CPU, minutes), SCALE=paper sweeps/<name>.yaml (GPUs).
SCALE ?= paper
SWEEP_SUFFIX = $(if $(filter quick,$(SCALE)),_quick,$(if $(filter paper,$(SCALE)),,$(error SCALE must be quick or paper, got '$(SCALE)')))
# make dashboard: the newest Optuna study below multirun/ unless STORAGE=sqlite:///... or postgresql://... is given
STORAGE ?= $(shell ls -t multirun/*/optuna.db multirun/*/*/optuna.db 2>/dev/null | head -n 1 | sed 's|^|sqlite:///|')
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(CONSTRAINTS)

.DEFAULT_GOAL := help
.PHONY: help install train test test-full bench bench-baselines sweep-depth sweep-heads sweep-T sweep-d dashboard clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt constraints-gpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev]'
	@touch $@

install: $(STAMP) ## Create .venv and install icar with pinned dependencies
	@$(PY) -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__)"

train: $(STAMP) ## Train the default config (override with ARGS="model=softmax data=commuting")
	$(PY) scripts/train.py $(ARGS)

test: $(STAMP) ## Run the fast tests (a few minutes on 2 cores)
	$(PY) -m pytest -q $(ARGS)

test-full: $(STAMP) ## Run every test, the slow scientific checks included
	$(PY) -m pytest -q -m "" $(ARGS)

bench: $(STAMP) ## Print training throughput, data-sampling share and Lightning overhead
	$(PY) scripts/bench_train.py $(ARGS)

bench-baselines: $(STAMP) ## Time GD step-size tuning and the baselines' evaluation (vs the explicit recursion)
	$(PY) scripts/bench_baselines.py $(ARGS)

sweep-depth: $(STAMP) ## MSE vs depth against L GD steps (SCALE=quick: CPU, < 10 min; ARGS="hydra/launcher=gpus")
	$(PY) scripts/train.py -m --config-dir sweeps --config-name depth$(SWEEP_SUFFIX) $(ARGS)

sweep-heads: $(STAMP) ## MSE and head orthogonality vs the number of heads (SCALE=quick | paper)
	$(PY) scripts/train.py -m --config-dir sweeps --config-name heads$(SWEEP_SUFFIX) $(ARGS)

sweep-T: $(STAMP) ## MSE vs context length T against one GD step (SCALE=quick | paper)
	$(PY) scripts/train.py -m --config-dir sweeps --config-name T$(SWEEP_SUFFIX) $(ARGS)

sweep-d: $(STAMP) ## MSE vs dimension d against one GD step (SCALE=quick | paper)
	$(PY) scripts/train.py -m --config-dir sweeps --config-name d$(SWEEP_SUFFIX) $(ARGS)

dashboard: $(STAMP) ## Open optuna-dashboard on the newest study (or STORAGE=sqlite:///... | postgresql://...)
	@test -n "$(STORAGE)" || { echo "no Optuna study below multirun/: give STORAGE=sqlite:///path/optuna.db"; exit 1; }
	$(VENV)/bin/optuna-dashboard $(STORAGE) $(ARGS)

clean: ## Remove run folders (runs/, multirun/); keeps .venv
	rm -rf runs multirun outputs lightning_logs
