# Every target creates .venv when it is missing (CPU torch first, then this package editable
# with the extras the target needs). Re-running is quick: a stamp per extras set records what
# is installed, and it is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test bench loadtest lint clean venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24" setuptools wheel
	# CPU torch first: a bare `torch` requirement would resolve to a multi-GB CUDA build.
	$(PIP) install --quiet "$(TORCH)"

$(VENV)/.stamp-%: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[$(subst -,$(comma),$*)]"
	@touch $@

comma := ,

venv: $(VENV)/.stamp-dev-examples-plot

demo: $(VENV)/.stamp-examples-plot
	$(VENV)/bin/splitinfer demo

test: $(VENV)/.stamp-dev-examples-plot
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.stamp-dev-examples-plot
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.stamp-dev-examples-plot
	@set -e; for b in benchmarks/bench_*.py; do \
	  [ -e "$$b" ] || { echo "no benchmarks yet"; break; }; \
	  echo "== $$b"; $(PY) "$$b"; done

loadtest: $(VENV)/.stamp-dev-examples-plot-loadtest
	@if [ -e loadtests/run.py ]; then $(PY) loadtests/run.py; else echo "no load tests yet"; fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
