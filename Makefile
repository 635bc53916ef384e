# Everything a developer or CI needs, from a fresh clone with only python3 (3.11+) and PyPI.
VENV ?= .venv
PYTHON ?= python3
PY = $(VENV)/bin/python
STAMP = $(VENV)/.installed
PYTEST_ARGS ?=

# The lowest versions the dependency ranges allow, in a venv of their own (SPEC section 9).
LOWEST_VENV ?= .venv-lowest
LOWEST_PY = $(LOWEST_VENV)/bin/python
LOWEST_STAMP = $(LOWEST_VENV)/.installed
LOWEST_CONSTRAINTS = .ci/constraints-lowest.txt
# The whole suite but the typing checks (mypy is a linter: `make lint` runs on the newest) and
# the bench smoke test (the bench measures the newest).
LOWEST_IGNORE = --ignore=tests/test_typing.py --ignore=tests/test_bench_smoke.py

.PHONY: install test test-lowest lint demo fleet bench bench-instructions chaos clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml changes; `touch pyproject.toml` forces it.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# pytest's own exit code stands: 5 (no tests collected) fails the target like any failure.
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite again on the lowest versions the dependency ranges allow (`make test`: the newest).
test-lowest: $(LOWEST_STAMP)
	$(LOWEST_PY) -m pytest $(LOWEST_IGNORE) $(PYTEST_ARGS)

$(LOWEST_PY):
	$(PYTHON) -m venv $(LOWEST_VENV)

$(LOWEST_STAMP): pyproject.toml $(LOWEST_CONSTRAINTS) | $(LOWEST_PY)
	$(LOWEST_PY) -m pip install --quiet --upgrade pip
	$(LOWEST_PY) -m pip install --quiet -c $(LOWEST_CONSTRAINTS) -e '.[test,workers]'
	$(LOWEST_PY) -m pip check
	touch $@

# mypy --strict as a user's project would run it: on workers/ and the README's example too.
lint: install
	$(PY) -m ruff check saga_celery workers tests
	$(PY) -m mypy --strict saga_celery workers
	$(PY) -m tests.typing_readme

demo: install
	$(PY) -m saga_celery.demo

# The fleet topology as local processes: private redis-server, two worker pools, beat, Flower.
fleet: install
	$(PY) -m workers.fleet $(FLEET_ARGS)

# Saga overhead against plain Celery chains, on a real prefork worker and real Redis.
bench: install
	$(PY) -m bench.run $(BENCH_ARGS)

# Instructions per saga step and per chain link under callgrind (needs valgrind): noise-free.
bench-instructions: install
	$(PY) -m bench.instructions $(BENCH_ARGS)

# 1,000+ sagas while workers are SIGKILLed, Redis restarts and a worker is SIGSTOPped.
chaos: install
	$(PY) -m tests.chaos.run $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
