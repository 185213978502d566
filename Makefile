# Two entry points for a fresh machine (see README.md):
#   make quickstart   install, then run the main job on the embedded default
#   make test         install with the dev extra, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -e '.[dev]'
	touch $@

.PHONY: install quickstart test bench
install: $(VENV)/.installed

quickstart: install
	$(BIN)/ttp-ray sweep sweeps/quickstart.yaml --out runs/quickstart

test: install
	$(BIN)/python -m pytest -q --timeout=300 tests
