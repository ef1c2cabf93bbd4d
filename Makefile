# The two commands a newcomer types: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"

demo: install
	$(BIN)/ketamap demo

# The default suite (tests/ and the package's docstring examples) leaves out the tests
# marked slow (9 to 14 minutes on two cores); `make test PYTEST_ARGS=` runs every
# test, as CI does (.ci/run). Test files run on PYTEST_WORKERS processes (pytest-xdist;
# a file stays on one process, so its module fixtures are made once; 0 runs them all in
# pytest's own process).
# Exit code 5 ("no tests collected") is turned into a failure: a suite that
# runs nothing must never pass.
PYTEST_ARGS ?= -m "not slow"
PYTEST_WORKERS ?= 2
test: install-test
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# Style: the linter and the formatter, as CI runs them (.ci/run).
lint: install-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) ketamap-demo .pytest_cache
