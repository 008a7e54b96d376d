# Everything runs in .venv, made and filled here, so a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test codegen demo clean
.DEFAULT_GOAL := test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The demo's own stamp: it needs scikit-learn and matplotlib, not the test extra's torch.
$(VENV)/demo-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $@

test: $(VENV)/installed
	$(PY) -m pytest

codegen: $(VENV)/installed
	$(VENV)/bin/symgrad codegen

demo: $(VENV)/demo-installed
	$(VENV)/bin/symgrad demo

clean:
	rm -rf $(VENV) build *.egg-info
