# The two commands of the README: `make demo` (main job) and `make test` (lint, types, test suite).
# Each creates .venv and installs the package into it on first use.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

.PHONY: demo test test-fast lint format
demo: $(INSTALLED)
	$(VENV)/bin/wesar-demo

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Two pytest-xdist workers, each test file on one of them (its module fixtures built once).
PYTEST := $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

test: lint
	$(PYTEST) tests

# The fast loop: everything but the integration runs (llm-foundry train path, several processes).
test-fast: $(INSTALLED)
	$(PYTEST) -m 'not slow' tests
