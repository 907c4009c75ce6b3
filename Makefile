# The one entry point. `make demo` runs the whole loop on embedded defaults; `make test` runs the suite.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1

.PHONY: install demo test lint typecheck up down status clean

install: $(VENV)/.installed

# The editable install records the package list when it runs, so a new package reinstalls it.
PACKAGES := $(wildcard */__init__.py services/*/__init__.py)

# torch is pinned to the CPU build that lies on this machine's disk; any other version downloads GBs.
$(VENV)/.installed: pyproject.toml $(PACKAGES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,tf]"
	touch $@

demo: install
	$(BIN)/shipyard demo

# Two workers on two cores: much of the suite waits on servers it started. Files that share a stack run
# on one worker (tests/conftest.py); `pytest` alone runs serially.
TEST_WORKERS ?= 2
test: install
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy shipyard_common shipyard_cli services pipelines

up: install
	$(BIN)/shipyard up

down:
	$(BIN)/shipyard down

status:
	$(BIN)/shipyard status

clean: down
	rm -rf .shipyard
