# Everything runs in .venv, made and filled here, so a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test codegen bench clean
.DEFAULT_GOAL := test

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest

codegen: $(VENV)/installed
	$(VENV)/bin/symgrad codegen

# torch and jax only for make bench, with a stamp of their own, so make test stays light.
$(VENV)/bench-installed: $(VENV)/installed
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $@

bench: $(VENV)/bench-installed
	mkdir -p build
	$(PY) -m codegen.bench --json build/bench.json

clean:
	rm -rf $(VENV) build *.egg-info
