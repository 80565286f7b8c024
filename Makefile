# reflow-supervisor — every target creates .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test bench soak system-deps browser-deps clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,microsandbox]'
	@rm -f $(VENV)/.installed-*; touch $@

# bubblewrap is the sandbox where microVMs cannot boot; install it when we may.
system-deps:
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "bubblewrap (bwrap) is missing and cannot be installed without root: apt-get install bubblewrap" >&2; exit 1; fi; }

# Debian's chromium for the dashboard's browser tests (Playwright cannot download its own
# here). Without it those tests skip, saying why; nothing else depends on it.
browser-deps:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing and cannot be installed without root: apt-get install chromium (the dashboard's browser tests will skip)" >&2; fi; }

run: $(STAMP) system-deps
	$(PY) -m supervisor run -c reflow.yaml

# fbp-protocol's fbp-test and fbp-spec (tests/test_fbp*.py), pinned by tests/fbp/package-lock.json.
FBP_NODE := tests/fbp/node_modules/.installed
$(FBP_NODE): tests/fbp/package.json tests/fbp/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: the FBP protocol tests need Node.js and npm (apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --prefix tests/fbp --no-audit --no-fund --loglevel=error >/dev/null
	@touch $@

test: $(STAMP) system-deps browser-deps $(FBP_NODE)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -m "not slow"

soak: $(STAMP) system-deps
	$(PY) -m pytest -q -m slow

# Ray is a baseline only: installed here, into the bench environment, never a project dependency.
# A failed install does not stop the bench; its table then says why Ray is missing.
bench: $(STAMP) system-deps
	@$(PY) -c 'import ray' 2>/dev/null || $(PY) -m pip install -q 'ray>=2.9' \
	  || echo "could not install ray>=2.9: the Ray baselines will be skipped" >&2
	$(PY) -m bench

clean:
	rm -rf $(VENV) .reflow .pytest_cache .hypothesis
