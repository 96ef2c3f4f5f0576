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
.PHONY: help demo test demo-check paper-smoke slurm-smoke test-long-runs test-slow gpu-prep gpu-wheels lint format docs screenshots venv clean-outputs

demo: venv ## Run the demo profile end to end, offline on CPU: demo data, the DVC pipeline, then check the science
	med-idefics data demo
	# `dvc repro`, DEMO_JOBS independent stages at a time; each stage's log in outputs/logs/
	med-idefics repro --jobs $(DEMO_JOBS)
	$(MAKE) --no-print-directory demo-check
	@echo "Results: reports/results.md · MLflow: $$(med-idefics tracking-uri --ui)"

test: venv ## Run the offline test-suite (no network, no GPU), two workers
	pytest -q -n 2 -m "not demo and not paper_smoke and not slow and not gpu_prep and not long_runs"

demo-check: venv ## Check that the demo's numbers move as a correct pipeline makes them move (make demo runs it)
	pytest -q -p no:cacheprovider -m demo tests/test_demo_results.py tests/test_demo_mlflow.py

paper-smoke: venv ## The paper profile's own DVC pipeline end to end on CPU (tiny weights, small data) in outputs/paper-smoke/
	python .ci/paper_smoke.py

slurm-smoke: venv ## The demo on a real single-node Slurm cluster (repro --slurm, seeds, mlflow run, torchrun) in outputs/slurm-smoke/
	python .ci/slurm_smoke.py

test-long-runs: venv ## Preemption signals, a tracking-server outage, a full disk, end to end (docs/long-runs.md; minutes)
	pytest -q -n 2 -m long_runs tests/test_long_runs.py

test-slow: venv ## Also run the tests marked slow
	pytest -q -n 2 -m "not demo and not paper_smoke and not gpu_prep"

gpu-prep: venv ## CPU stand-ins for the first GPU run: gpu_check.py --dry-run, recompiles on transformers 5.24 and 5.17
	pytest -q -n 2 -m gpu_prep

# The lent GPU machine (docs/gpu.md): Linux x86_64, Python 3.12, torch 2.11 and transformers 5.17, no network. These
# wheels, at the project's pins, go first on its PYTHONPATH; tokenizers stays the machine's (0.23.2: within
# transformers' range, and its 3 MB would push what travels past the 60 MiB this target keeps to).
GPU_CHECK := gpu-check
GPU_WHEELS := transformers peft accelerate bitsandbytes
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
gpu-wheels: venv ## The GPU run's packages at the project's pins and Idefics2-8b's tokenizer file, into gpu-check/ (docs/gpu.md)
	rm -rf $(GPU_CHECK)/wheels $(GPU_CHECK)/processor
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --abi cp312 --abi abi3 --abi none $(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_CHECK)/wheels \
	  $$($(BIN)/python -c "from importlib.metadata import version as v; print(*[f'{n}=={v(n)}' for n in '$(GPU_WHEELS)'.split()])")
	$(BIN)/python benchmarks/gpu_check.py --save-processor $(GPU_CHECK)/processor
	@tree=$$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1); extra=$$(du -sb $(GPU_CHECK) | cut -f1); \
	  echo "travels: $$(( (tree + extra) / 1024 / 1024 )) MiB ($$(( tree / 1024 )) KiB tracked + $(GPU_CHECK)/ $$(( extra / 1024 )) KiB)"; \
	  test $$(( tree + extra )) -le $$(( 60 * 1024 * 1024 )) || { echo "over 60 MiB: the lent machine takes 64 in all"; exit 1; }

lint: venv ## ruff lint + format check
	ruff check .
	ruff format --check .

format: venv ## ruff autofix + format
	ruff check --fix .
	ruff format .

docs: venv ## Build the documentation site into site/ (mkdocs build --strict: a broken link or anchor fails it)
	# NO_MKDOCS_2_WARNING: Material's notice, printed on every build, about MkDocs' own future (not about this site)
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict

screenshots: venv ## After make demo: the MLflow runs table, chart view and champion version into docs/images/
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -q && apt-get install -y -q chromium; \
	  else echo "make screenshots needs Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; }
	$(BIN)/python -m pip install -q -e '.[screenshots]'
	python docs/screenshots.py

venv: $(VENV)/.installed ## Create .venv (CPU torch from disk first, then the package with dev and docs extras)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,docs]'
	# Tests only: Mistral-7B's tokenizer for the tiny-real-processor base, from the mistral-common wheel, kept off
	# sys.path (importable without its deps it breaks transformers' processors; with them it downgrades numpy).
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/mistral-common mistral-common==1.13.1
	touch $@

clean-outputs: ## Remove pipeline outputs (outputs/, metrics/, reports/), keeping data/ and mlflow.db
	rm -rf outputs metrics reports

help: ## This list
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-14s %s\n", $$1, $$2}'
