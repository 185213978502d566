# Two entry points for a fresh machine (see README.md):
#   make quickstart   install, then run the main job on the embedded default
#   make test         install with the dev extra, then run the test suite
#   make test-stress  the test suite with the CPU oversubscribed: STRESS_PROCS busy processes beside it (killed at
#                     the end), every time limit scaled by STRESS_TIMEOUT_SCALE; STRESS_TESTS narrows it
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

.PHONY: install quickstart test test-stress bench
install: $(VENV)/.installed

quickstart: install
	$(BIN)/ttp-ray sweep sweeps/quickstart.yaml --out runs/quickstart

test: install
	$(BIN)/python -m pytest -q --timeout=300 tests

STRESS_PROCS ?= 4
STRESS_TIMEOUT_SCALE ?= 4
STRESS_TESTS ?= tests
test-stress: install
	@pids=""; for i in $$(seq $(STRESS_PROCS)); do $(BIN)/python -c 'while True: pass' & pids="$$pids $$!"; done; \
	trap 'kill $$pids 2>/dev/null' EXIT INT TERM; \
	echo "test-stress: $(STRESS_PROCS) busy processes ($$pids) beside the suite on $$(nproc) CPU(s)"; \
	TTP_RAY_TIMEOUT_SCALE=$(STRESS_TIMEOUT_SCALE) $(BIN)/python -m pytest -q \
		--timeout=$$((300 * $(STRESS_TIMEOUT_SCALE))) $(STRESS_TESTS)
