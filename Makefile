# Quick start: `make demo` (a small run on synthetic phantoms) and `make test` (the whole suite).
# Each target builds the virtualenv it needs. The venv lives outside the clone, keyed on the
# dependency list, so fresh clones (CI) reuse it and any dependency change builds a new one.

PYTHON ?= python3.11
DEPS_KEY := $(shell $(PYTHON) -c "import tomllib,hashlib,json;p=tomllib.load(open('pyproject.toml','rb'))['project'];print(hashlib.sha256(json.dumps([p['dependencies'],p['optional-dependencies']]).encode()).hexdigest()[:16])")
VENV ?= $(HOME)/.cache/cxr-attention-sweeps/venv-$(DEPS_KEY)
BIN := $(VENV)/bin
STAMP := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: venv develop demo test test-fast lint format bench clean help

help:
	@echo "make demo       phantoms -> cache -> the demo sweep, logged to demo-output/sweeps/mlflow.db"
	@echo "make test       ruff + the whole test suite (slow tests included, as CI runs it)"
	@echo "make test-fast  ruff + the tests not marked slow"
	@echo "make bench      CPU benchmarks (about 7 min) -> benchmarks/results/*.json"
	@echo "venv: $(VENV)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq --disable-pip-version-check "setuptools>=64" wheel
	$(BIN)/pip install -qq --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Point the shared venv's editable install at this checkout (fast when it already does).
develop: $(STAMP)
	@$(BIN)/python -P -c "import sys,trainer,pathlib; sys.exit(pathlib.Path(trainer.__file__).resolve().parents[1] != pathlib.Path('$(CURDIR)').resolve())" 2>/dev/null \
		|| $(BIN)/pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e .

# phantoms → dataset cache → the demo sweep (Optuna + ASHA) → best trials + the MLflow UI command
demo: develop
	$(BIN)/cxr-sweep phantoms --out demo-output/phantoms --task ne --patients 150 --size 96 \
		--cache demo-output/cache/ne --overwrite
	$(BIN)/cxr-sweep sweep run search_spaces/demo.yaml --overwrite

lint: develop
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: develop
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: develop
	$(BIN)/python benchmarks/step_time.py --out benchmarks/results/step_time_cpu.json
	$(BIN)/python benchmarks/sweep_efficiency.py --out benchmarks/results/sweep_efficiency_cpu.json

clean:
	rm -rf demo-output .pytest_cache .ruff_cache *.egg-info
