# The two commands of the README: `make demo` (main job) and `make test` (test suite).
# Each creates .venv and installs the package into it on first use.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(INSTALLED)

.PHONY: demo test
demo: $(INSTALLED)
	$(VENV)/bin/wesar-demo

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -q tests
