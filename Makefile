# The one entry point. `make demo` runs the whole loop on embedded defaults; `make test` runs the suite.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1

.PHONY: install lock demo test lint typecheck up down status clean infra-tools

install: $(VENV)/.installed

# The editable install records the package list when it runs, so a new package reinstalls it.
PACKAGES := $(wildcard */__init__.py services/*/__init__.py)

# Exactly what requirements.lock pins (make lock writes it; CONTRIBUTING.md), then shipyard itself with
# --no-deps, built with the pinned setuptools; pip check proves the set complete and consistent. torch is
# pinned to the CPU build that lies on this machine's disk (2.13.0+cpu); any other version downloads GBs.
$(VENV)/.installed: requirements.lock pyproject.toml $(PACKAGES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $$(grep -E '^(pip|setuptools|wheel)==' requirements.lock)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

# A fresh resolution of pyproject.toml (with torch==2.13.0 and the dev and tf extras) in a scratch venv,
# written to requirements.lock; then the check that CI runs. Upgrades: CONTRIBUTING.md.
lock:
	$(PYTHON) tools/lock.py
	$(PYTHON) tools/check_lock.py

demo: install
	$(BIN)/shipyard demo

# Two workers on two cores: much of the suite waits on servers it started. Each test file runs on one
# worker (loadscope), so a module's fixtures start once, and the files that share a package's stack
# (tests/e2e, two of tests/pipelines) run on one worker together (tests/scheduling.py); `pytest` alone
# runs serially. (loadgroup's marks do nothing with pytest 9: xdist 3.8 renames items through a node
# attribute pytest no longer reads.)
TEST_WORKERS ?= 2
test: install
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadscope

# The same three checks as .pre-commit-config.yaml; the import contracts are in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy shipyard_common shipyard_cli services pipelines
	$(BIN)/lint-imports

# Helm and a venv of checkov and kubernetes-validate in .tools/infra/ (tools/infra-tools.lock), apart
# from .venv: tests/infra check the Helm chart and the Terraform with them. Quick when already there.
infra-tools:
	python3 tools/infra_tools.py

up: install
	$(BIN)/shipyard up

down:
	$(BIN)/shipyard down

status:
	$(BIN)/shipyard status

clean: down
	rm -rf .shipyard
