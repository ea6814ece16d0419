# bdia — one entry point for set-up, tests and the main jobs. `make help` lists the targets.
SHELL := /bin/bash
PYTHON_BOOT ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: help venv test test-all sample sample-torchrun sample-demo accuracy bench clean tables \
	reproduce-table2 reproduce-table2-mini

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv (Python 3.11) and install the pinned dependencies

test: $(STAMP)  ## run the test suite (CPU, offline)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)  ## run every test, the slow ones included
	$(PY) -m pytest -q

sample: $(STAMP)  ## main job: BDIA-EDM on the embedded digits model + FD/KID -> results/sample/default/
	$(PY) scripts/sample.py solver=bdia_edm dataset=digits metrics=digits $(ARGS)

NPROC ?= 2
sample-torchrun: $(STAMP)  ## sample on NPROC processes with torchrun (GPUs if present, else CPU/gloo; NPROC=2)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) scripts/sample.py launcher=torchrun $(ARGS)

sample-demo: $(STAMP)  ## sweep the four solvers on the analytic digits model (Hydra multirun) -> results/sample/digits_demo/
	$(PY) scripts/sample.py -m experiment=digits_demo $(ARGS)

accuracy: $(STAMP)  ## solver error vs NFE on the Gaussian-mixture problem -> results/solver_accuracy.{md,csv}
	$(PY) scripts/solver_accuracy.py

bench: $(STAMP)  ## BDIA/base wall time, round-trip error vs gamma/N/dtype, editing cost -> results/bench/
	$(PY) benchmarks/bench_solvers.py
	$(PY) benchmarks/bench_roundtrip.py

# Paper tables (configs/tables/*.yaml): Hydra multiruns that resume when re-run, then the table is rebuilt from
# the run folders' metrics.json. NGPU=8: torchrun with 8 ranks per run; LAUNCHER=slurm: Hydra's submitit
# launcher; DRY_RUN=1: print every job (overrides, seeds, rank layout) and run nothing; ARGS: extra overrides.
NGPU ?= 1
LAUNCHER ?= local
REPRODUCE = $(PY) scripts/reproduce.py --ngpu $(NGPU) --launcher $(LAUNCHER) $(if $(DRY_RUN),--dry-run)

reproduce-table2: $(STAMP)  ## Table 2: EDM vs BDIA-EDM FID on the 4 EDM networks (GPUs; NGPU=8, LAUNCHER=slurm, DRY_RUN=1)
	$(REPRODUCE) table2 $(ARGS)

reproduce-table2-mini: $(STAMP)  ## Table 2's twin on the embedded digits model, CPU -> results/embedded/table2.{md,csv,png}
	$(REPRODUCE) table2_mini $(ARGS)

tables:  ## rebuild every table from the run folders present (scripts/make_tables.py --all)
	$(PY) scripts/make_tables.py --all

clean:  ## remove run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache
