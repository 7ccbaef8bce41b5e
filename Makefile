PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt

.PHONY: install demo compare dask-demo test bench bench-scale bench-gpu lint clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m examples.run_demo --out runs/demo

# the demo's run, validated on four curation settings side by side (reuses what `make demo` trained)
compare: $(STAMP)
	$(BIN)/python -m examples.run_demo --out runs/demo --arms no_filter,basic_filters,clip_score,curated

dask-demo: $(STAMP)
	$(BIN)/python -m examples.run_demo --out runs/dask-demo --executor dask

# two pytest workers, each test file on one of them (its module fixtures are built once); TEST_WORKERS=0: one process
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --out benchmarks/results.md

# crawl scale alone: filter, dedup and ledger over 1M and 4M synthetic samples on a 2-worker LocalCluster
bench-scale: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --out benchmarks/results.md --only scale

bench-gpu:
	bash benchmarks/gpu_check.sh

lint: $(STAMP)
	$(BIN)/ruff check curate examples tests benchmarks
	$(BIN)/ruff format --check curate examples tests benchmarks

clean:
	rm -rf runs build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
