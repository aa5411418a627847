# icar: `make train` runs the default experiment, `make test` the tests; both install what they need in .venv.
PYTHON ?= python3
VENV ?= .venv
# constraints.txt pins torch to 2.13.0 (the CPU wheel of this project's machines). With a CUDA build of torch
# already in $(VENV): make install CONSTRAINTS=constraints-gpu.txt (the same pins, torch left alone).
CONSTRAINTS ?= constraints.txt
ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(CONSTRAINTS)

.DEFAULT_GOAL := help
.PHONY: help install train test test-full bench bench-baselines clean

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

clean: ## Remove run folders (runs/, multirun/); keeps .venv
	rm -rf runs multirun outputs lightning_logs
