# Every target creates .venv when it is missing (CPU torch first, then this package editable
# with the extras the target needs). Re-running is quick: a stamp per extras set records what
# is installed, and it is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_ARGS ?=
LOADTEST_ARGS ?=
REPLICAS ?= 3
CLUSTER_ARGS ?=

.PHONY: demo test bench fuzz loadtest lint clean venv prometheus haproxy cluster image test-image containers

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
	$(VENV)/bin/splitinfer demo $(DEMO_ARGS)

test: $(VENV)/.stamp-dev-examples-plot-loadtest prometheus haproxy
	# pytest's own script: `python -m pytest` would put the working directory on sys.path
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The server images (deploy/Dockerfile), with podman or docker, whichever is installed:
# splitinfer:<version>-onnxruntime (no torch) and splitinfer:<version>-torch. IMAGE_BASE is the
# base image (the slim Python image by default; `debian-local` builds a Debian bookworm base
# with mmdebstrap, once per machine); pip's configuration here goes in (docs/deploy.md).
IMAGE_BASE ?= python:3.12-slim-bookworm
IMAGE_ARGS ?=
image: containers
	$(PYTHON) deploy/image.py --base "$(IMAGE_BASE)" $(IMAGE_ARGS)

# Builds the images, then runs the tests that start them (marker `image`, left out of `make
# test`): non-root, read-only bundle, readiness and HEALTHCHECK, answers, drain, bad mounts,
# three replicas behind HAProxy with one killed.
test-image: image $(VENV)/.stamp-dev-examples-plot-loadtest haproxy
	$(PY) -m pytest -m image tests/integration/deploy $(PYTEST_ARGS)

# System packages the tests run for real, installed when missing (needs root and apt-get):
# tests/integration/deploy/: test_prometheus.py and test_scale.py run a real Prometheus and
# test_deploy.py its
# promtool (Debian's `prometheus`); test_scale.py and `make cluster` run HAProxy (`haproxy`).
define apt_install
	@$(2) || { \
	  [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1) >/dev/null; \
	} || { echo "make test needs $(1) on PATH: run 'apt-get install $(1)' as root (Debian/Ubuntu), or install it another way" >&2; exit 1; }
endef

prometheus:
	$(call apt_install,prometheus,command -v prometheus >/dev/null && command -v promtool >/dev/null)

haproxy:
	$(call apt_install,haproxy,command -v haproxy >/dev/null)

# A container engine for `make image` (podman with runc, and mmdebstrap for a local base), unless
# podman or a running docker is there already.
containers:
	$(call apt_install,podman runc mmdebstrap,command -v podman >/dev/null || docker info >/dev/null 2>&1)

# A local cluster until Ctrl-C: REPLICAS (1..3) `splitinfer serve` on loopback ports, HAProxy in
# front (deploy/haproxy/haproxy.cfg), Prometheus scraping them all; it prints the URLs. It serves
# the load test's bundle (compiled once, as `make loadtest` does), so in another terminal:
#   make loadtest LOADTEST_ARGS="--url http://127.0.0.1:PORT"
CLUSTER_MODEL ?= efficientnet-lite0
CLUSTER_REPO  ?= loadtests/.cache/repo
cluster: $(VENV)/.stamp-dev-examples-plot-loadtest prometheus haproxy
	$(PY) loadtests/run.py --model $(CLUSTER_MODEL) --build-bundle $(CLUSTER_REPO)
	$(PY) deploy/haproxy/cluster.py --repository $(CLUSTER_REPO) --replicas $(REPLICAS) $(CLUSTER_ARGS)

# mypy checks every module of the package (the symlinks splitinfer/<room> make the checkout the
# package as imported; pyproject's [tool.mypy] names it).
lint: $(VENV)/.stamp-dev-examples-plot
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(VENV)/.stamp-dev-examples-plot-bench
	@set -e; for b in benchmarks/bench_*.py; do \
	  [ -e "$$b" ] || { echo "no benchmarks yet"; break; }; \
	  echo "== $$b"; $(PY) "$$b"; done

# Headless locust run against a local server (loadtests/README.md); about 3.5 minutes plus a
# one-time compile. E.g. make loadtest LOADTEST_ARGS="--run-time 60 --shape spike --workers 2"
# Fuzz the frame and codec decoders and the HTTP endpoint with 100,000 inputs (FUZZ_EXAMPLES=N for
# more); `make test` runs a few hundred, `make bench` records the figures in results/reliability.md.
FUZZ_EXAMPLES ?= 100000
fuzz: $(VENV)/.stamp-dev-examples-plot
	$(PY) benchmarks/bench_reliability.py --fuzz-only --fuzz-examples $(FUZZ_EXAMPLES)

loadtest: $(VENV)/.stamp-dev-examples-plot-loadtest
	$(PY) loadtests/run.py $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
