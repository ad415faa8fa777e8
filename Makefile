# The two set-up commands of the README. Each creates .venv and installs what it needs.
#   make demo   train, export and benchmark on the embedded digits (no download)
#   make test   the test suite (slow tests: make test-all)
PYTHON ?= python3
VENV ?= .venv
# The torch build this project is tested with; override for another (e.g. a CPU-only wheel).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: demo test test-all clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/stn-deploy demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf $(VENV) runtimes/cpp/build export/demo
