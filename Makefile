# Two commands matter: `make run` (the default simulation) and `make test`.
# Both create .venv when missing and install the pinned versions of constraints.txt.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Where datasets are looked for (the CIFAR-10 copy in ../shared/data when present).
DATA_DIR ?= $(if $(wildcard ../shared/data/cifar10-jpg.tar.gz),$(abspath ../shared/data),$(HOME)/.cache/mh-pfedhn/data)
RESULTS_DIR ?= $(CURDIR)/results
# A run-config file of conf/ (the paper's settings), e.g. SETTING=conf/cifar10-pathological-cnn.toml
SETTING ?=
# Simulated clients (num-supernodes); empty: the value in FEDERATION_CONFIG (10).
CLIENTS ?=
# Extra run-config overrides, over SETTING, e.g. RUN_CONFIG="num-server-rounds=5 hn-update='mean'".
# Exported and passed as its own argument ("$$RUN_CONFIG"), so string values keep
# whichever quotes they were written with ('mean' or "mean").
RUN_CONFIG ?=
export RUN_CONFIG
FEDERATION_CONFIG ?= $(CURDIR)/simulation.toml
# `make compare`: a preset of strategies x seeds (conf/compare/*.toml), its output folder
# and extra options, e.g. COMPARE_ARGS="--only fedavg,local --seeds 42 --table-only"
PRESET ?= conf/compare/cifar10-cnn-50clients.toml
COMPARE_OUT ?= $(RESULTS_DIR)/compare-$(basename $(notdir $(PRESET)))
COMPARE_ARGS ?=
# flwr would otherwise `uv sync` the app's dependencies for every run (and pull
# CUDA builds of torch); the venv already has them.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install run compare test deploy-test bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@echo "Installing into $(VENV) (pinned versions of constraints.txt; the first time takes a few minutes)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: the pinned 2.13.0 CPU build; any other torch pulls CUDA wheels.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# tools/run.py checks the whole configuration (pyproject defaults + SETTING + DATA_DIR /
# RESULTS_DIR + RUN_CONFIG) and the data first: a problem is one message and exit 2,
# before Flower or Ray starts. Then `flwr run` on a private SuperLink (own FLWR_HOME,
# free port) that is stopped with its Ray workers at the end or on Ctrl-C. A failed run
# (also a failed ServerApp, for which `flwr run` itself exits 0) fails the target.
# tools.run exits 2 (bad config or data), 1 (failed run) or 130 (Ctrl-C); make reports
# any of them as an error. Relative paths are taken from this folder.
run: install
	$(BIN)/python -m tools.run --setting "$(SETTING)" --clients "$(CLIENTS)" \
		--data-dir "$(DATA_DIR)" --results-dir "$(RESULTS_DIR)" \
		--federation-config "$(FEDERATION_CONFIG)" --run-config "$$RUN_CONFIG"

# Every strategy x seed of PRESET through `flwr run` on a private SuperLink (stopped
# afterwards), then comparison.md / .json / .png in COMPARE_OUT. Finished runs are skipped,
# so the same command resumes. Paths are absolute: the SuperLink runs elsewhere.
compare: install
	$(BIN)/python -m tools.compare $(PRESET) --out $(abspath $(COMPARE_OUT)) \
		--data-dir $(abspath $(DATA_DIR)) $(COMPARE_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

# A real deployment on loopback (docs/guides/deploying.md): SuperLink with TLS and
# SuperNode authentication, two SuperNodes, `flwr run` (2 rounds), a refused
# unregistered SuperNode, SuperNode restarts (state-dir), and the simulation's
# seconds per round for comparison. Options, e.g. DEPLOY_TEST_ARGS="--workdir /tmp/dt".
DEPLOY_TEST_ARGS ?=
deploy-test: install
	$(BIN)/python scripts/deploy_test.py $(DEPLOY_TEST_ARGS)

# Benchmarks: each prints a table and writes bench/results/<name>.json.
bench: install
	$(BIN)/python -m bench.hypernet
	$(BIN)/python -m bench.round --data-dir $(DATA_DIR)
	$(BIN)/python -m bench.scale --data-dir $(DATA_DIR)
	$(BIN)/python -m bench.comm
	$(BIN)/python -m bench.step

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
