# deltavec: the two commands a newcomer needs are `make demo` and `make test`.
#
# `make` sets up what is missing and nothing else: the virtual environment is
# rebuilt only when pyproject.toml or constraints.txt change (torch is large and
# installs once), and the Delta JARs are fetched into ~/.m2 only when absent.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DELTA_VERSION := $(shell sed -n 's/.*"delta-spark==\([0-9.]*\)".*/\1/p' pyproject.toml)
DELTA_JAR := $(HOME)/.m2/repository/io/delta/delta-spark_2.13/$(DELTA_VERSION)/delta-spark_2.13-$(DELTA_VERSION).jar
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-cluster test-gpu bench bench-int8 bench-search bench-serve bench-serve-refresh bench-merge bench-freshness lint check-alerts typecheck setup jars clean

setup: $(STAMP) jars

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# Spark's Ivy looks in ~/.m2/repository before Maven Central: warming it once
# makes every later Spark start (and the test suite) work offline.
jars: $(DELTA_JAR)

$(DELTA_JAR):
	@if command -v mvn >/dev/null 2>&1; then \
		mvn --batch-mode --quiet dependency:get -Dartifact=io.delta:delta-spark_2.13:$(DELTA_VERSION) -Dtransitive=true; \
	else \
		echo "mvn not found: Spark will fetch the Delta JARs from Maven Central on first start"; \
	fi

demo: setup
	$(BIN)/deltavec demo --config conf/deltavec.toml

# The standalone-cluster test starts a master, two workers and their executors
# (minutes on two cores), so it runs in its own target; .ci/run runs both.
# GPU tests need a CUDA device: `make test-gpu` on a machine that has one.
test: setup
	$(BIN)/python -m pytest -m "not cluster and not gpu" $(PYTEST_ARGS)

test-cluster: setup
	$(BIN)/python -m pytest -m "cluster and not gpu" $(PYTEST_ARGS)

test-gpu: setup
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not fault and not cluster" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/throughput.py

# Only encoder, encoder_int8 and st_onnx_int8, interleaved, on 2,000 texts (< 5 min).
bench-int8: setup
	$(BIN)/python benchmarks/throughput.py --int8-quick

bench-search: setup
	$(BIN)/python benchmarks/search.py

# `deltavec serve` under 16 concurrent clients per mode, then at fixed rates, while
# 1,000-row MERGEs land (~4 min).
bench-serve: setup
	$(BIN)/python benchmarks/serve.py

# One refresh after each of the serving benchmark's MERGEs, in process: how long it
# holds the interpreter the queries need, with and without the job's text hashes.
bench-serve-refresh: setup
	$(BIN)/python benchmarks/serve_refresh.py

# MERGE cost against 10k, 100k and 1M-row targets (about 2 GB of disk, 20+ minutes).
bench-merge: setup
	$(BIN)/python benchmarks/merge_scaling.py

# Commit-to-searchable latency of small commits against a running job. Its set-up of a
# 100,000-row target is still too slow on 2 cores (over 7 minutes); --target-rows 20000 works.
bench-freshness: setup
	$(BIN)/python benchmarks/freshness.py

lint: setup
	$(BIN)/ruff check streaming tests benchmarks
	$(BIN)/ruff format --check streaming tests benchmarks

# The alert rules' own unit tests need promtool (Debian package "prometheus"),
# which the test suite does not assume.
check-alerts:
	cd conf/prometheus && promtool check rules alerts.yml && promtool test rules alerts_test.yml

typecheck: setup
	$(BIN)/mypy

clean:
	rm -rf data checkpoints/demo spark-warehouse metastore_db derby.log .pytest_cache
