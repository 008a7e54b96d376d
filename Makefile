# Everything runs in .venv, made and filled here, so a fresh clone needs only python3 and make;
# the derivation documents and their tests add Node.js with npm (KaTeX) and, as root, Chromium.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NODE := build/node
KATEX := $(NODE)/node_modules/katex/dist

.PHONY: test codegen fuzz demo docs screenshot chromium bench bench-engine clean
.DEFAULT_GOAL := test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# make codegen's own stamp: the generator needs sympy, numpy and jinja2, and numba (the fast extra) to verify
# the fused kernels it writes by default; not the test extra's torch, scikit-learn and matplotlib.
$(VENV)/codegen-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[fast]"
	touch $@

# The demo's own stamp: it needs scikit-learn and matplotlib, not the test extra's torch.
$(VENV)/demo-installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $@

# KaTeX at the version the lockfile pins (npm warns that its command-line tool, which we do not use,
# wants a newer Node.js than 20).
$(NODE)/installed: codegen/docs_assets/package.json codegen/docs_assets/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: install Node.js 20 or newer with npm"; exit 1; }
	mkdir -p $(NODE)
	cp $^ $(NODE)/
	cd $(NODE) && npm ci --no-audit --no-fund
	touch $@

chromium:
	@command -v chromium >/dev/null || { apt-get update && apt-get install -y --no-install-recommends chromium; } \
		|| { echo "chromium not found and not installable here: apt-get install chromium (as root)"; exit 1; }

# The suite is CPU-bound: pytest-xdist runs it on the machine's 2 cores. worksteal balances them (test_fast.py and
# test_trust.py alone are over a third of it) and keeps most files on one worker, so few module fixtures are built
# twice. A plain .venv/bin/python -m pytest runs serially; make test PYTEST_XDIST= does too.
PYTEST_XDIST ?= -n 2 --dist worksteal
test: $(VENV)/installed $(NODE)/installed chromium
	$(PY) -m pytest $(PYTEST_XDIST)

codegen: $(VENV)/codegen-installed
	$(VENV)/bin/symgrad codegen

# the expression fuzzer at full size (make test runs a few dozen of its expressions)
fuzz: $(VENV)/installed
	mkdir -p build
	$(PY) tests/fuzz.py --count 2000 --seed 1 --report build/fuzz.json

demo: $(VENV)/demo-installed
	$(VENV)/bin/symgrad demo

# Every derivation into build/docs (derivations.md, derivations.html), and the documentation site into
# build/docs/site (docsite/build.py, mkdocs.yml): open build/docs/site/index.html. Both offline, KaTeX from build/node.
docs: $(VENV)/installed $(NODE)/installed
	$(VENV)/bin/symgrad docs --out build/docs --katex $(KATEX)
	$(PY) -m docsite.build --out build/docs/site

# The README's pictures: build/docs/derivations.html, and two pages of the site.
screenshot: $(VENV)/installed $(NODE)/installed chromium
	$(VENV)/bin/symgrad docs --out build/docs --katex $(KATEX) --screenshot codegen/docs_assets/derivations.png
	$(PY) -m docsite.build --out build/docs/site --screenshots docsite/screenshots

# torch and jax only for make bench, with a stamp of their own, so make test stays light.
$(VENV)/bench-installed: $(VENV)/installed
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $@

bench: $(VENV)/bench-installed
	mkdir -p build
	$(PY) -m codegen.bench --json build/bench.json

# symgrad codegen's own cost: seconds per operation and stage for the catalog and the slowest declarations found,
# then a cold run, one with no input changed and one with a declaration changed, against issue 25's targets
bench-engine: $(VENV)/installed
	$(PY) -m codegen.bench.engine

clean:
	rm -rf $(VENV) build *.egg-info
