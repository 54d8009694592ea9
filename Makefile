# Tandem — the two commands a newcomer runs are `make demo` and `make test`.
# Every target that needs Python first creates/refreshes .venv from the pinned requirements.txt.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell sha1sum requirements.txt | cut -c1-12)
STAMP := $(VENV)/.installed-$(REQ_HASH)
DATA ?= ../shared/data/ml-100k
PYTEST_ARGS ?=
export OPENBLAS_NUM_THREADS ?= 1
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONPATH := $(CURDIR)

.PHONY: setup java system-deps proto test demo eval bench bench-generator bench-pipeline experiment chaos stop lint clean

setup: java $(STAMP) proto

java:
	@command -v java >/dev/null 2>&1 || { echo "ERROR: Java 17 is required for Spark (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@java -version 2>&1 | grep -qE 'version "(17|18|19|2[0-9])' || { echo "ERROR: Java 17+ is required for Spark; found: $$(java -version 2>&1 | head -1)"; exit 1; }

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	@# the Spark provider (or anything else) must never replace pyspark's files
	@! $(BIN)/pip show pyspark-client >/dev/null 2>&1 || { echo "ERROR: pyspark-client is installed and clobbers pyspark"; exit 1; }
	@rm -f $(VENV)/.installed-* && touch $@

# Debian packages some tests and the demo use (redis-server for the Feast Redis profile,
# chromium for the Airflow UI browser test). Installed only when missing; never fatal.
system-deps:
	@missing=""; command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $$missing >/dev/null) \
	      || echo "WARNING: could not install$$missing; tests that need them will skip"; \
	  else echo "WARNING: not root, cannot install$$missing; tests that need them will skip"; fi; fi

proto: $(STAMP)
	@$(BIN)/python -m tandem.contracts.build

# the full chaos scenarios (marker `chaos`) run in `make chaos`, their quick subset here;
# the 30 slowest tests are listed at the end (where the suite's time goes)
test: setup system-deps
	$(BIN)/python -m pytest -m "not chaos" --durations=30 $(PYTEST_ARGS)

demo: setup system-deps
	$(BIN)/python -m tandem.cli demo

eval: setup
	$(BIN)/python -m tandem.cli eval --data $(DATA)

bench: setup
	$(BIN)/python bench/serving.py $(BENCH_ARGS)

bench-generator: setup
	$(BIN)/python bench/generator.py $(GEN_ARGS)

# The hourly and nightly jobs per world size (PIPELINE_ARGS="--rungs 1m,10m,50m"; default 1m).
bench-pipeline: setup
	$(BIN)/python bench/pipeline.py $(PIPELINE_ARGS)

# A/A, power, OPE and canary rehearsal on the simulator (EXPERIMENT_ARGS=--quick: the CI subset).
experiment: setup
	$(BIN)/python -m tandem.experiments.rehearsal $(EXPERIMENT_ARGS)

# Every fault scenario under load against real processes -> reports/chaos.json
# (CHAOS_ARGS="--only rebalance,overload_10x" for some); fails when one scenario did not pass.
chaos: setup system-deps
	$(BIN)/python bench/chaos.py $(CHAOS_ARGS)

stop:
	@test -x $(BIN)/python && $(BIN)/python -m tandem.cli stop || echo "nothing to stop"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf var reports
