# The README's two commands: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Offline-safe defaults; users with network may override (e.g. HF_HUB_OFFLINE=0 make demo).
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export DO_NOT_TRACK ?= 1
export FIFTYONE_DATABASE_VALIDATION ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export NO_ALBUMENTATIONS_UPDATE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

OPENCLIPART := /usr/share/openclipart/png/animals
APT := $(shell command -v apt-get 2>/dev/null)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help venv demo demo-local demo-data up down test sysdeps-test clean

help:
	@echo "make demo   - install into $(VENV), start the local Prefect stack and run build-dataset/demo on it"
	@echo "make up     - start the local Prefect stack (server on 127.0.0.1:$(PREFECT_PORT), worker, deployments)"
	@echo "make down   - stop it"
	@echo "make demo-local - the same pipeline without Prefect (the jurassiclass CLI)"
	@echo "make test   - install test needs and run the test suite"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip check
	touch $@

demo-data:
	@if [ ! -d $(OPENCLIPART) ]; then \
	  if [ -n "$(APT)" ]; then echo "installing openclipart-png (public-domain demo images)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq openclipart-png >/dev/null; \
	  else echo "No $(OPENCLIPART) and no apt-get: edit manifests/demo.yaml so its folder source points at any ROOT/<class>/<images> tree."; exit 1; fi; \
	fi

# The local Prefect stack (flows/stack.py): state, logs and pid files in .prefect/; idempotent.
PREFECT_PORT ?= 4200
export JURASSICLASS_PREFECT_PORT := $(PREFECT_PORT)

up: venv
	$(BIN)/python -m flows.stack up

down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m flows.stack down; fi

# build-dataset ends by publishing a dataset version; its event triggers train/demo (followed here).
demo: venv demo-data up
	@date +%s > .prefect/demo-start
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect deployment run 'build-dataset/demo' --watch
	@$(BIN)/jurassiclass catalog --workdir workspaces/demo
	@$(BIN)/python -m flows.stack wait train/demo $$(cat .prefect/demo-start)
	@$(BIN)/jurassiclass models list -m manifests/demo.yaml
	@echo "dataset: workspaces/demo/published/   models: workspaces/demo/models/"
	@echo "Prefect UI (runs, artifacts, the retrain/demo schedule): http://127.0.0.1:$(PREFECT_PORT)   stop the stack: make down"

demo-local: venv demo-data
	$(BIN)/jurassiclass run --manifest manifests/demo.yaml
	$(BIN)/jurassiclass train --manifest manifests/demo.yaml

# The review App's browser test drives Debian's headless Chromium.
sysdeps-test:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ -n "$(APT)" ]; then echo "installing chromium (headless browser for the review App test)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and no apt-get: install a Chromium browser for the App test"; exit 1; fi; \
	fi

test: venv sysdeps-test
	$(BIN)/python -m pytest

clean:
	rm -rf workspaces .pytest_cache
