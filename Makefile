# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/smr
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test bench lint install install-test services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when pyproject.toml changes.
# The `smr` client is its own distribution (client/), installed here too so `make run` prints
# working `smr` commands.
$(VENV)/.installed: pyproject.toml client/pyproject.toml | $(BIN)/python
	$(PIP) install -e . -e ./client
	touch $@

# The test suite trains real DP models, so it installs the dp extra (torch, opacus) too.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e ".[test,dp]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Embedded defaults: SQLite in var/, objects in var/objects, a local keyring in var/keys.
# demo_setup writes the secret key and the 0600 database file before migrating, and before
# gunicorn and Celery start, so they all read one SECRET_KEY; umask 077 keeps var/ private.
run: install
	@umask 077 && $(BIN)/python manage.py demo_setup --migrate --base-url http://$(HOST):$(PORT)
	@echo "Serving on http://$(HOST):$(PORT)  (API docs: http://$(HOST):$(PORT)/api/docs/)"
	HOST=$(HOST) PORT=$(PORT) exec deploy/run-embedded.sh

services:
	@bash .ci/services.sh

# Lint first: a style or type error fails the run before the slow part starts.
test: lint services
	DATABASE_URL=$(TEST_DATABASE_URL) $(BIN)/python -m pytest -q \
	  --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

bench: install-test services
	DATABASE_URL=$(TEST_DATABASE_URL) $(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .coverage
