# med-idefics — `make help` lists the targets. The first two are the README's two commands.
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# DVC stages call `med-idefics …`; put the project's venv first so they find it.
export PATH := $(BIN):$(PATH)
export PYTHONUNBUFFERED := 1
# The tiny demo model's matrices are too small to gain from threads; two threads per process only contend.
export OMP_NUM_THREADS ?= 1
# Stages `make demo` runs at once: as many as the cores hold at OMP_NUM_THREADS threads each (2 on a 2-core laptop at
# one thread; 1 at two threads: two 2-thread stages on 2 cores ran ~45x slower, their threads spinning on each other).
# (nproc itself would answer OMP_NUM_THREADS: hence the cores without it.)
DEMO_JOBS ?= $(shell n=$$(( $$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) / $(OMP_NUM_THREADS) )); echo $$(( n > 0 ? n : 1 )))

.DEFAULT_GOAL := help
.PHONY: help demo test demo-check paper-smoke slurm-smoke test-slow lint format venv clean-outputs

demo: venv ## Run the demo profile end to end, offline on CPU: demo data, the DVC pipeline, then check the science
	med-idefics data demo
	# `dvc repro`, DEMO_JOBS independent stages at a time; each stage's log in outputs/logs/
	med-idefics repro --jobs $(DEMO_JOBS)
	$(MAKE) --no-print-directory demo-check
	@echo "Results: reports/results.md · MLflow: $$(med-idefics tracking-uri --ui)"

test: venv ## Run the offline test-suite (no network, no GPU), two workers
	pytest -q -n 2 -m "not demo and not paper_smoke and not slow"

demo-check: venv ## Check that the demo's numbers move as a correct pipeline makes them move (make demo runs it)
	pytest -q -p no:cacheprovider -m demo tests/test_demo_results.py tests/test_demo_mlflow.py

paper-smoke: venv ## The paper profile's own DVC pipeline end to end on CPU (tiny weights, small data) in outputs/paper-smoke/
	python .ci/paper_smoke.py

slurm-smoke: venv ## The demo on a real single-node Slurm cluster (repro --slurm, seeds, mlflow run, torchrun) in outputs/slurm-smoke/
	python .ci/slurm_smoke.py

test-slow: venv ## Also run the tests marked slow
	pytest -q -n 2 -m "not demo and not paper_smoke"

lint: venv ## ruff lint + format check
	ruff check .
	ruff format --check .

format: venv ## ruff autofix + format
	ruff check --fix .
	ruff format .

venv: $(VENV)/.installed ## Create .venv (CPU torch from disk first, then the package with dev extras)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Tests only: Mistral-7B's tokenizer for the tiny-real-processor base, from the mistral-common wheel, kept off
	# sys.path (importable without its deps it breaks transformers' processors; with them it downgrades numpy).
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/mistral-common mistral-common==1.13.1
	touch $@

clean-outputs: ## Remove pipeline outputs (outputs/, metrics/, reports/), keeping data/ and mlflow.db
	rm -rf outputs metrics reports

help: ## This list
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-14s %s\n", $$1, $$2}'
