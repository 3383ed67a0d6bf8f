# The README's two commands: `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Offline-safe defaults; users with network may override (e.g. HF_HUB_OFFLINE=0 make demo).
export HF_HUB_DISABLE_TELEMETRY ?= 1
export DO_NOT_TRACK ?= 1
export FIFTYONE_DATABASE_VALIDATION ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export NO_ALBUMENTATIONS_UPDATE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

OPENCLIPART := /usr/share/openclipart/png/animals
APT := $(shell command -v apt-get 2>/dev/null)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help venv demo demo-data test sysdeps-test clean

help:
	@echo "make demo   - install into $(VENV) and run the whole pipeline on manifests/demo.yaml"
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

demo: venv demo-data
	$(BIN)/jurassiclass run --manifest manifests/demo.yaml

sysdeps-test:
	@true

test: venv sysdeps-test
	$(BIN)/python -m pytest

clean:
	rm -rf workspaces .pytest_cache
