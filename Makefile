# Tidings: `make run` starts a development server, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two stamps: `make run` installs what the server needs, the checks add the test tools
# (mypy, ruff, pytest, Playwright, ...) on top, so a first `make run` stays quick.
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test lint typecheck unit rest jstest clean

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(RUN_STAMP)
	$(BIN)/tidings serve

# Branch coverage of tidings over the two pytest runs (the second appends); servers the
# tests start as subprocesses are not measured (tests/README.md).
COVERAGE := --cov=tidings --cov-branch

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

# The unit rung first: seconds, so that a broken change fails before the slow rungs run.
unit: $(TEST_STAMP)
	$(BIN)/python -m pytest -m unit $(COVERAGE) --cov-report=

# Every other rung (in-process, server, Redis, browser), then the coverage of both runs.
rest: $(TEST_STAMP)
	$(BIN)/python -m pytest -m "not unit" $(COVERAGE) --cov-append \
		--cov-report=term-missing:skip-covered

jstest:
	node --test clients/js/test/

# In this order (make runs prerequisites left to right): the cheapest checks first.
test: lint typecheck unit rest jstest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
