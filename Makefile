# The two commands of the README: `make demo` (main job) and `make test` (lint, types, test suite).
# Each creates .venv on first use and installs into it what it needs: `make demo` the package
# with its pinned stack (llm-foundry, Composer, torch: about 7 GB, a few minutes, pip's progress
# shown); `make test` also the dev extras (pytest, ruff, pyright).
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
# Stamps, newer than pyproject.toml once installed: the package alone, and the package with its dev extras.
INSTALLED_DEMO := $(VENV)/.installed-demo
INSTALLED := $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip

# A .venv with the dev extras installed from this pyproject.toml has everything the demo needs.
$(INSTALLED_DEMO): pyproject.toml | $(VENV)/bin/python
	@if [ $(INSTALLED) -nt pyproject.toml ]; then \
		echo 'wesar-composer is installed in $(VENV) (with the dev extras)'; \
	else \
		echo 'Installing wesar-composer and its pinned stack into $(VENV): about 7 GB, a few minutes on first use'; \
		$(PIP) install -e . || exit 1; \
	fi
	touch $@

$(INSTALLED): pyproject.toml | $(VENV)/bin/python
	@echo 'Installing wesar-composer with its dev extras (pytest, ruff, pyright) into $(VENV)'
	$(PIP) install -e '.[dev]'
	touch $@ $(INSTALLED_DEMO)

.PHONY: demo test test-fast lint format
demo: $(INSTALLED_DEMO)
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

# The wheel bundle that scripts/gpu_check.sh installs offline on a GPU machine (Python 3.12 unless
# GPU_PYTHON says otherwise); git-ignored, under the 64 MiB that such a machine is sent.
GPU_PYTHON ?= 3.12
.PHONY: gpu-bundle
gpu-bundle: $(INSTALLED)
	$(VENV)/bin/python scripts/gpu_bundle.py --python $(GPU_PYTHON)
