# bdia — one entry point for set-up, tests and the main jobs. `make help` lists the targets.
SHELL := /bin/bash
PYTHON_BOOT ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: help venv test test-all sample sample-torchrun sample-demo accuracy bench clean

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

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

bench: $(STAMP)  ## wall time of BDIA solvers relative to their base solvers -> results/bench/
	$(PY) benchmarks/bench_solvers.py

clean:  ## remove run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache
