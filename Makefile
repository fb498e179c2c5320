# pgolf: every target creates .venv on first use and installs what it needs.
#
#   make run                          set-up + the whole pipeline on the embedded corpus (CPU, minutes)
#   make test                         set-up + the test suite
#   make check RECIPE=sidecar48       params and predicted artifact bytes, no training
#   make audit RECIPE=depth_recurrent causality battery
#   make submit RECIPE=sidecar48 SEEDS=1337,42,2025 DATA=path/to/shards [NPROC=8]
#   make reproduce RECIPE=sidecar48 [SEEDS=13,1111,1337]   our figures beside the published ones
#
# TORCH selects the PyTorch build: the default is the CPU build pinned for this project.
# On a CUDA machine pass a CUDA build and its wheel index, e.g.
#   make test TORCH=torch==2.13.0 TORCH_INDEX=<your PyTorch CUDA wheel index URL>

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
RECIPE ?= tiny
SEEDS ?=
DATA ?=
NPROC ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INDEX_ARG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
DATA_ARG := $(if $(DATA),--data $(DATA),)
SEEDS_ARG := $(if $(SEEDS),--seeds $(SEEDS),)
NPROC_ARG := $(if $(NPROC),--nproc $(NPROC),)

.PHONY: run test check audit submit reproduce setup corpus clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(INDEX_ARG) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

corpus: $(STAMP)
	$(BIN)/pgolf data embedded

run: corpus
	$(BIN)/pgolf run $(RECIPE) $(DATA_ARG)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/pgolf check $(RECIPE)

audit: $(STAMP)
	$(BIN)/pgolf audit $(RECIPE)

submit: $(STAMP)
	$(BIN)/pgolf submit $(RECIPE) $(SEEDS_ARG) $(DATA_ARG) $(NPROC_ARG)

reproduce: $(STAMP)
	$(BIN)/pgolf reproduce $(RECIPE) $(SEEDS_ARG) $(DATA_ARG)

clean:
	rm -rf artifacts
