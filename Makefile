# Two commands matter: `make run` (the default simulation) and `make test`.
# Both create .venv when missing and install the pinned versions of constraints.txt.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Where datasets are looked for (the CIFAR-10 copy in ../shared/data when present).
DATA_DIR ?= $(if $(wildcard ../shared/data/cifar10-jpg.tar.gz),$(abspath ../shared/data),$(HOME)/.cache/mh-pfedhn/data)
RESULTS_DIR ?= $(CURDIR)/results
# Extra run-config overrides, e.g. RUN_CONFIG="num-server-rounds=5 hn-update='mean'".
# Exported and passed as its own --run-config ("$$RUN_CONFIG"), so string values keep
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
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: the pinned 2.13.0 CPU build; any other torch pulls CUDA wheels.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The local SuperLink that `flwr run` starts stays up after the run; it is started
# from a neutral folder so that ClientApps never import code from this checkout's
# working directory instead of the submitted app.
run: install
	mkdir -p $(RESULTS_DIR)
	cd $(VENV) && PATH="$(abspath $(BIN)):$$PATH" flwr run $(CURDIR) \
		--federation-config $(FEDERATION_CONFIG) \
		--run-config 'data-dir="$(DATA_DIR)" results-dir="$(RESULTS_DIR)"' \
		--run-config "$$RUN_CONFIG" \
		--stream

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

# A real deployment on loopback (docs/deployment.md): SuperLink with TLS and
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

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache
