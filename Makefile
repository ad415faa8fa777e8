# The two set-up commands of the README. Each creates .venv and installs what it needs.
#   make demo   train, export and benchmark on the embedded digits (no download)
#   make test   the test suite (slow tests: make test-all)
# One environment for both: the package with [openvino] (the demo's OpenVINO rows, and the
# tests of the OpenVINO runner and the C++ runtime, which skip without it), [int8] (NNCF) and
# [dev] (pytest and what the tests import).
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
	$(BIN)/python -m pip install --quiet -e '.[openvino,int8,dev]'
	# tritonserver and its Python-backend stub for the real-server tests. Without its numpy<2
	# pin: the served model passes tensors through DLPack, which numpy 2 reads correctly.
	$(BIN)/python -m pip install --quiet --no-deps 'nvidia-pytriton>=0.7,<0.8'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/stn-deploy demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf $(VENV) runtimes/cpp/build export/demo
