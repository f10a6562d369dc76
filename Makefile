# The two commands of the README. Both are idempotent: the virtual environment is made
# once (a stamp file records which requirements it was built from) and reused.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-dev

.PHONY: demo test env

$(STAMP): requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements-dev.txt
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	touch $(STAMP)

env: $(STAMP)

## demo: make the environment, install tuneless, run the Rosenbrock race, print where the picture is
demo: $(STAMP)
	$(VENV)/bin/tuneless race rosenbrock --out out/race-rosenbrock.png

## test: make the environment with the test extras and run the whole test suite
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
