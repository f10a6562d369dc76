# The two commands of the README. Both are idempotent: the virtual environment is made
# once (a stamp file records which requirements it was built from) and reused.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-dev

.PHONY: demo test env long-runs

$(STAMP): requirements-dev.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements-dev.txt
	$(VENV)/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(STAMP)

env: $(STAMP)

## demo: make the environment, install tuneless, run the Rosenbrock race, print where the picture is
demo: $(STAMP)
	$(VENV)/bin/tuneless race rosenbrock --out out/race-rosenbrock.png

## test: make the environment with the test extras and run the whole test suite (two processes, a file each at a time)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

## long-runs: one real run of 10^5 steps per optimizer family (tests/test_long_runs.py; CI runs it after the suite)
long-runs: $(STAMP)
	TUNELESS_LONG_RUN_STEPS=100000 $(VENV)/bin/python -m pytest -q --timeout 900 tests/test_long_runs.py -k test_a_long_run_keeps_learning
