# Two entry points for a fresh machine (see README.md):
#   make quickstart   install, then run the main job on the embedded default
#   make test         install with the dev extra, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: install quickstart test bench
install: $(VENV)/.installed

quickstart: install
	$(BIN)/ttp-ray finetune --dataset digits-5to9 --model digits-resnet --lr 0.05 --momentum 0.9 \
		--batch-size 64 --loss ce --steps 300 --eps 0.01 --log-every 10

test: install
	$(BIN)/python -m pytest -q --timeout=300 tests
