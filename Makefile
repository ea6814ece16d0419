# bdia — one entry point for set-up, tests and the main jobs. `make help` lists the targets.
SHELL := /bin/bash
PYTHON_BOOT ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
# W&B: logger=wandb logs offline into the run folder (bdia.logger); WANDB_MODE=online|disabled picks another mode.
# The tests switch it off themselves (tests/conftest.py), so nothing here forces it.

# Torch threads for the CPU jobs below: one, unless OMP_NUM_THREADS is set. On a busy 2-core machine torch's default
# of two threads ran `make sample` several times slower (README, "Set-up"); GPU jobs do not care.
CPU_THREADS := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}

# Where the measurement and table targets write: results/local/ (not tracked), so a run on your machine never
# rewrites the tracked results/ files. REGENERATE=1 writes the tracked files (when you mean to update them).
RESULTS := $(if $(filter 1,$(REGENERATE)),results,results/local)

.PHONY: help venv test test-numerics test-all sample sample-torchrun sample-demo accuracy study bench clean tables summarize \
	reproduce-table1 reproduce-table1-mini reproduce-table2 reproduce-table2-mini reproduce-table3 reproduce-table3-mini \
	tiny-sd edit-demo editing-cost flow-accuracy tiny-flow reproduce-flow-mini demo test-browser optimize samplers

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements-demo.txt
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps -r requirements-demo.txt  # Gradio (why --no-deps: see the file)
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv (Python 3.11) and install the pinned dependencies

test: $(STAMP)  ## run the test suite (CPU, offline; slow and browser tests excluded)
	$(PY) -m pytest -q -m "not slow and not browser"

# Another machine's CPU: ATen's kernels for another instruction set (default = no SIMD, avx2, avx512) and
# another thread count. CI runs this after `make test`.
CAPABILITY ?= default
THREADS ?= 1
test-numerics: $(STAMP)  ## rerun the floating-point-sensitive tests as another CPU would (CAPABILITY=default|avx2, THREADS=1|2)
	ATEN_CPU_CAPABILITY=$(CAPABILITY) OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q -m "numerics and not slow"

test-all: $(STAMP)  ## run every test, the slow ones included
	$(PY) -m pytest -q

SAMPLE := scripts/sample.py solver=bdia_edm dataset=digits metrics=digits
sample: $(STAMP)  ## main job: BDIA-EDM on the embedded digits model + FD/KID -> results/sample/default/
	$(CPU_THREADS) $(PY) $(SAMPLE) $(ARGS)

NPROC ?= 2
sample-torchrun: $(STAMP)  ## `make sample` on NPROC processes with torchrun (GPUs, else CPU/gloo; NPROC=2) -> results/sample/torchrun/
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) $(SAMPLE) launcher=torchrun \
		hydra.sweep.dir=results/sample/torchrun $(ARGS)

sample-demo: $(STAMP)  ## sweep the four solvers on the analytic digits model (Hydra multirun) -> results/sample/digits_demo/
	$(CPU_THREADS) $(PY) scripts/sample.py -m experiment=digits_demo $(ARGS)

summarize:  ## tabulate + plot any results folder or sweep: make summarize DIR=results/sample/digits_demo [ARGS="--y ... --x ..."]
	@test -n "$(DIR)" || { echo "error: make summarize DIR=<results folder>" >&2; exit 1; }
	$(PY) scripts/summarize.py "$(DIR)" $(ARGS)

accuracy: $(STAMP)  ## solver error vs NFE on the Gaussian-mixture problem -> results/local/solver_accuracy.{md,csv} (REGENERATE=1: results/)
	$(PY) benchmarks/solver_accuracy.py --out-dir $(RESULTS)

study: $(STAMP)  ## which BDIA-EDM? every bdia_edm formulation vs EDM -> results/local/solver_study.{md,csv,png} (REGENERATE=1: results/)
	OMP_NUM_THREADS=1 $(PY) benchmarks/solver_study.py --out-dir $(RESULTS) $(ARGS)

samplers: $(STAMP)  ## which sampler? BDIA, Rex, DPM-Solver++, UniPC, iPNDM, DDIM, EDM on 3 problems (~10 min) -> results/local/samplers.{md,csv,png} (REGENERATE=1: results/)
	OMP_NUM_THREADS=1 $(PY) benchmarks/sampler_study.py --out-dir $(RESULTS) $(ARGS)

bench: $(STAMP)  ## BDIA/base wall time, round-trip error vs gamma/N/dtype, editing cost, speed, gradients -> results/local/bench/ (REGENERATE=1: results/)
	$(PY) benchmarks/bench_solvers.py --out-dir $(RESULTS)/bench
	$(PY) benchmarks/bench_roundtrip.py --out-dir $(RESULTS)/bench
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_pipeline_roundtrip.py --out-dir $(RESULTS)/bench
	OMP_NUM_THREADS=1 $(PY) benchmarks/editing_cost.py --out-dir $(RESULTS)/editing
	OMP_NUM_THREADS=2 $(PY) benchmarks/bench_speed.py --out-dir $(RESULTS)/bench
	OMP_NUM_THREADS=2 $(PY) benchmarks/precision_quality.py --out-dir $(RESULTS)/bench
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_gradients.py --out-dir $(RESULTS)/bench

# Paper tables (configs/tables/*.yaml): Hydra multiruns that resume when re-run, then the table is rebuilt from
# the run folders' metrics.json. NGPU=8: torchrun with 8 ranks per run; LAUNCHER=slurm: Hydra's submitit
# launcher; DRY_RUN=1: print every job (overrides, seeds, rank layout) and run nothing; ARGS: extra overrides.
NGPU ?= 1
LAUNCHER ?= local
REPRODUCE = $(PY) scripts/reproduce.py --ngpu $(NGPU) --launcher $(LAUNCHER) --results-dir $(RESULTS) $(if $(DRY_RUN),--dry-run)

TINY_SD := results/tiny_sd/RANDOM_WEIGHTS.txt
$(TINY_SD): | $(STAMP)
	$(PY) scripts/make_tiny_sd.py results/tiny_sd --clip results/tiny_clip

tiny-sd: $(TINY_SD)  ## write the tiny random Stable Diffusion (+ tiny CLIP) used offline: results/tiny_sd, results/tiny_clip

reproduce-table1: $(STAMP)  ## Table 1: DDIM vs BDIA-DDIM on SD 2.1-base, COCO FID + CLIP (ARGS="coco_captions=... metrics.fid.ref=...")
	$(REPRODUCE) table1 $(ARGS)

reproduce-table1-mini: $(TINY_SD)  ## Table 1's twin on the tiny random SD, CPU (pipeline check) -> results/local/mini/table1.*
	$(CPU_THREADS) $(REPRODUCE) table1_mini $(ARGS)

reproduce-table2: $(STAMP)  ## Table 2: EDM vs BDIA-EDM FID on the 4 EDM networks (GPUs; NGPU=8, LAUNCHER=slurm, DRY_RUN=1)
	$(REPRODUCE) table2 $(ARGS)

reproduce-table2-mini: $(STAMP)  ## Table 2's twin on the embedded digits model, CPU -> results/local/embedded/table2.{md,csv,png}
	$(CPU_THREADS) $(REPRODUCE) table2_mini $(ARGS)

reproduce-table3: $(STAMP)  ## Table 3: inversion of real images on SD 1.4 (float64): DDIM inv., EDICT, null-text, BDIA
	$(REPRODUCE) table3 $(ARGS)

reproduce-table3-mini: $(TINY_SD)  ## Table 3's twin on the tiny random SD, CPU -> results/local/mini/table3.*
	$(CPU_THREADS) $(REPRODUCE) table3_mini $(ARGS)

edit-demo: $(TINY_SD)  ## invert + edit scikit-learn's china.jpg with all four methods on the tiny SD -> results/edit/default/
	$(CPU_THREADS) $(PY) scripts/edit.py model=tiny-sd num_steps=10 grid_scale=4 $(ARGS)

# The web demo (scripts/demo.py, Gradio) on 127.0.0.1, offline on the tiny SD; ARGS: e.g. "model=sd15 port=7861".
demo: $(TINY_SD)  ## serve the exact-editing web demo on http://127.0.0.1:7860 (tiny SD offline; ARGS="model=sd15")
	$(PY) scripts/demo.py $(ARGS)

# The browser test drives the demo in Debian's headless Chromium (installed here when absent; nothing is downloaded
# at run time: Playwright's Python client talks to /usr/bin/chromium). CI runs it after `make test`.
CHROMIUM ?= /usr/bin/chromium
test-browser: $(STAMP)  ## the web demo driven in headless Chromium: upload, invert, two edits (installs Debian's chromium if absent)
	@test -x $(CHROMIUM) || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }
	BDIA_CHROMIUM=$(CHROMIUM) BDIA_REQUIRE_BROWSER=1 $(PY) -m pytest -q -m browser $(ARGS)

optimize: $(STAMP)  ## noise optimisation through all 35 NFE of BDIA-EDM: the digits classifier reads class 3 -> results/optimize/ (ARGS="target_class=7")
	$(PY) scripts/optimize.py $(ARGS)

flow-accuracy: $(STAMP)  ## BDIA-flow vs flow Euler / flow Heun at equal NFE, rectified-flow mixture -> results/local/flow/accuracy.{md,csv,png} (REGENERATE=1: results/)
	OMP_NUM_THREADS=1 $(PY) benchmarks/flow_accuracy.py --out-dir $(RESULTS)/flow

TINY_FLOW := results/tiny_flux/RANDOM_WEIGHTS.txt
$(TINY_FLOW): | $(STAMP)
	$(PY) scripts/make_tiny_flow.py

tiny-flow: $(TINY_FLOW)  ## write the tiny random SD3 and FLUX.1 (flow matching) used offline: results/tiny_sd3, results/tiny_flux

reproduce-flow-mini: $(TINY_FLOW)  ## every flow inversion method (BDIA, flow Euler, RF-Inversion, RF-Solver, FireFlow) on tiny SD3 / FLUX, float64 + float32 -> results/local/flow/roundtrip.{md,csv,png}
	$(CPU_THREADS) $(REPRODUCE) flow_mini $(ARGS)

editing-cost: $(STAMP)  ## NFE, wall time and round-trip error of the inversion methods (tiny SD) -> results/local/editing/
	OMP_NUM_THREADS=1 $(PY) benchmarks/editing_cost.py --out-dir $(RESULTS)/editing

tables:  ## rebuild every table from the run folders present (scripts/make_tables.py --all) -> results/local/ (REGENERATE=1: results/)
	$(PY) scripts/make_tables.py --all --results-dir $(RESULTS)

clean:  ## remove what the runs wrote under results/ (run folders, tiny models, results/local/); never your files
	$(PY) scripts/clean.py
	rm -rf .pytest_cache
