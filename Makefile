# icar: `make train` runs the default experiment, `make test` the tests; both install what they need in .venv.
PYTHON ?= python3
VENV ?= .venv
# constraints.txt pins torch to 2.13.0 (the CPU wheel of this project's machines). With a CUDA build of torch
# already in $(VENV): make install CONSTRAINTS=constraints-gpu.txt (the same pins, torch left alone).
CONSTRAINTS ?= constraints.txt
ARGS ?=
# Sweeps: SCALE=cpu runs sweeps/<name>_quick.yaml (CPU, minutes; SCALE=quick is the same), SCALE=paper
# sweeps/<name>.yaml (GPUs): the scales of icar.claims.base.Scale. The sweep-* targets default to paper, the figure
# targets (fig3, ..., figures) to cpu; each claim module's protocol names the same sweep files.
SCALE ?=
suffix_for = $(if $(filter cpu quick,$(1)),_quick,$(if $(filter paper,$(1)),,$(error SCALE must be cpu (or quick) or paper, got '$(1)')))
SWEEP_SUFFIX = $(call suffix_for,$(or $(SCALE),paper))
FIG_SUFFIX = $(call suffix_for,$(or $(SCALE),cpu))
# a figure sweep: its record (aggregate/figure.json) names the make command that produced it
figure_command = ICAR_COMMAND="make $(1)$(if $(SCALE), SCALE=$(SCALE))$(if $(ARGS), ARGS='$(ARGS)')"
# RESUME=<sweep folder> (or RESUME=last: the newest of that sweep) continues a sweep in its folder: finished jobs are
# skipped, interrupted ones resume from their checkpoints, missing ones run (icar/orchestration/resumable.py)
RESUME ?=
resume_dir = $(if $(filter last,$(RESUME)),$(or $(lastword $(sort $(wildcard multirun/$(1)/*/))),$(error RESUME=last: no sweep folder below multirun/$(1)/)),$(if $(RESUME),$(or $(wildcard $(RESUME)),$(error RESUME=$(RESUME): no such sweep folder (give the folder of the sweep to continue, or RESUME=last)))))
resume_arg = $(if $(RESUME),hydra.sweep.dir=$(patsubst %/,%,$(call resume_dir,$(1))))
# ... and keeps its record under results/<figure>/<scale>/ (committed: make reproduction reads only those)
figure_sweep = $(call figure_command,$(1)) $(PY) scripts/train.py -m --config-dir sweeps --config-name $(2)$(FIG_SUFFIX) $(call resume_arg,$(2)$(FIG_SUFFIX)) $(ARGS) \
	&& $(PY) scripts/reproduction.py --keep $(or $(call resume_dir,$(2)$(FIG_SUFFIX)),multirun/$(2)$(FIG_SUFFIX))
# make dashboard: the newest Optuna study below multirun/ unless STORAGE=sqlite:///... or postgresql://... is given
STORAGE ?= $(shell ls -t multirun/*/optuna.db multirun/*/*/optuna.db 2>/dev/null | head -n 1 | sed 's|^|sqlite:///|')
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(CONSTRAINTS)

.DEFAULT_GOAL := help
.PHONY: help install train test test-full bench bench-baselines sweep-depth sweep-heads sweep-T sweep-d dashboard clean \
	prop2 fig3 fig4 fig5 fig6 fig7 softmax-vs-linear figures reproduction

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt constraints-gpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[dev]'
	@touch $@

install: $(STAMP) ## Create .venv and install icar with pinned dependencies
	@$(PY) -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__)"

train: $(STAMP) ## Train the default config (override with ARGS="model=softmax data=commuting")
	$(PY) scripts/train.py $(ARGS)

# pytest-xdist: one worker per core; tests of one xdist_group (the SLURM cluster) share a worker
PYTEST = $(PY) -m pytest -q -n auto --dist loadgroup

test: $(STAMP) ## Run the fast tests on every core (a few minutes on 2 cores)
	$(PYTEST) $(ARGS)

test-full: $(STAMP) ## Run every test, the slow scientific checks included
	$(PYTEST) -m "" $(ARGS)

bench: $(STAMP) ## Print training throughput, data-sampling share and Lightning overhead
	$(PY) scripts/bench_train.py $(ARGS)

bench-baselines: $(STAMP) ## Time GD step-size tuning and the baselines' evaluation (vs the explicit recursion)
	$(PY) scripts/bench_baselines.py $(ARGS)

sweep-depth: $(STAMP) ## MSE vs depth against L GD steps (SCALE=cpu: < 10 min; ARGS="hydra/launcher=gpus")
	$(PY) scripts/train.py -m --config-dir sweeps --config-name depth$(SWEEP_SUFFIX) $(call resume_arg,sweep_depth$(SWEEP_SUFFIX)) $(ARGS)

sweep-heads: $(STAMP) ## MSE and head orthogonality vs the number of heads (SCALE=cpu | paper)
	$(PY) scripts/train.py -m --config-dir sweeps --config-name heads$(SWEEP_SUFFIX) $(call resume_arg,sweep_heads$(SWEEP_SUFFIX)) $(ARGS)

sweep-T: $(STAMP) ## MSE vs context length T against one GD step (SCALE=cpu | paper)
	$(PY) scripts/train.py -m --config-dir sweeps --config-name T$(SWEEP_SUFFIX) $(call resume_arg,sweep_T$(SWEEP_SUFFIX)) $(ARGS)

sweep-d: $(STAMP) ## MSE vs dimension d against one GD step (SCALE=cpu | paper)
	$(PY) scripts/train.py -m --config-dir sweeps --config-name d$(SWEEP_SUFFIX) $(call resume_arg,sweep_d$(SWEEP_SUFFIX)) $(ARGS)

prop2: $(STAMP) ## Claim 1: one augmented layer = one GD step (SCALE=cpu (default) | paper)
	$(call figure_sweep,prop2,prop2)

fig3: $(STAMP) ## Figure 3: A, B, B^T A, P of the diagonal model, unitary and rotation contexts
	$(call figure_sweep,fig3,fig3)

fig4: $(STAMP) ## Figure 4: AR(1) fits of real token embeddings vs shuffled (SCALE=paper: every window)
	$(call figure_command,fig4) $(PY) scripts/fig4.py $(if $(FIG_SUFFIX),,max_windows=0) $(ARGS) \
	&& $(PY) scripts/reproduction.py --keep runs/fig4

fig5: $(STAMP) ## Figure 5: MSE vs depth against L steps of GD (SCALE=cpu (default) | paper)
	$(call figure_sweep,fig5,fig5)

fig6: $(STAMP) ## Figure 6: positional encoding only, d = 1, mu = 50..300
	$(call figure_sweep,fig6,fig6)

fig7: $(STAMP) ## Figure 7: multi-head, raw tokens, general orthogonal W: MSE, head orthogonality, P
	$(call figure_sweep,fig7,fig7)

softmax-vs-linear: $(STAMP) ## Claim 7: the protocols with linear and softmax attention side by side
	$(call figure_sweep,softmax-vs-linear,softmax_vs_linear)

figures: ## Every figure, then REPRODUCTION.md (SCALE=cpu: about 20 min on 2 CPU cores; SCALE=paper: GPUs)
	@# -k: one failing figure does not stop the others; REPRODUCTION.md is written either way, make still fails
	$(MAKE) -k prop2 fig3 fig4 fig5 fig6 fig7 softmax-vs-linear; status=$$?; $(MAKE) reproduction && exit $$status

reproduction: $(STAMP) ## Regenerate REPRODUCTION.md from the committed records (results/), training nothing
	$(PY) scripts/reproduction.py

dashboard: $(STAMP) ## Open optuna-dashboard on the newest study (or STORAGE=sqlite:///... | postgresql://...)
	@test -n "$(STORAGE)" || { echo "no Optuna study below multirun/: give STORAGE=sqlite:///path/optuna.db"; exit 1; }
	$(VENV)/bin/optuna-dashboard $(STORAGE) $(ARGS)

clean: ## Remove run folders (runs/, multirun/); keeps .venv
	rm -rf runs multirun outputs lightning_logs
