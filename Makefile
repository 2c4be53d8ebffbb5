# The two commands of the README's quick start, and what they build on.
#   make demo  -> virtual environment, install, demo data when absent, then scheduler+runner+gateway
#   make test  -> virtual environment, install (with Chromium for the dashboard test), the whole suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check install browser postgres redis bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

# Chromium from the OS packages (the test drives it with Playwright; no browser download), and the
# fonts tools the dashboard's glyph test reads
browser:
	@command -v chromium >/dev/null 2>&1 && command -v fc-query >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium fontconfig fonts-dejavu-core >/dev/null; }

# PostgreSQL from the OS packages for cluster mode's state tests (tests/cluster_fixtures.py starts a
# throwaway server with initdb/pg_ctl, found under /usr/lib/postgresql/<version>/bin or on PATH)
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql >/dev/null; }

# redis-server from the OS packages: the end-to-end benchmark's Redis pub/sub baseline starts its own
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

demo: install
	$(BIN)/runwire demo-data --if-absent
	@# Ctrl-C stops everything cleanly and honcho exits 130: that is the normal end of a demo, not an error
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start || [ $$? -eq 130 ]

# lint and type check first (seconds), then the suite
check: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install browser postgres check
	$(BIN)/python -m pytest

bench: install redis postgres
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .runwire
