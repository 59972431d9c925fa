# Quick start: `make demo` (a small run on synthetic phantoms) and `make test` (the whole suite).
# Each target builds the virtualenv it needs. The venv lives outside the clone, keyed on the
# dependency list, so fresh clones (CI) reuse it and any dependency change builds a new one.

PYTHON ?= python3.11
DEPS_KEY := $(shell $(PYTHON) -c "import tomllib,hashlib,json;p=tomllib.load(open('pyproject.toml','rb'))['project'];print(hashlib.sha256(json.dumps([p['dependencies'],p['optional-dependencies']]).encode()).hexdigest()[:16])")
VENV ?= $(HOME)/.cache/cxr-attention-sweeps/venv-$(DEPS_KEY)
BIN := $(VENV)/bin
STAMP := $(VENV)/.deps-installed
PYTEST_ARGS ?=

.PHONY: venv develop demo test test-fast lint format bench bench-gpu shortcut images stack-test check-manifests clean help

help:
	@echo "make demo       phantoms -> lung U-Net -> cache -> the demo sweep, logged to demo-output/sweeps/mlflow.db"
	@echo "make test       ruff + the whole test suite (slow tests included, as CI runs it)"
	@echo "make test-fast  ruff + the tests not marked slow"
	@echo "make bench      CPU benchmarks (under 10 min) -> benchmarks/results/*.json"
	@echo "make bench-gpu  GPU benchmarks (~7 min on one H100/H200) -> benchmarks/results/*_gpu*.json"
	@echo "make shortcut   does the attention loss beat a shortcut? (~20 min on 2 CPU cores; docs/results.md)"
	@echo "make images     build the stack's images (docker/build.sh: BASE_IMAGE, CA_BUNDLE, PIP_INDEX_URL ...)"
	@echo "make stack-test the compose stack for real: build, up, a sweep with faults, export, down (Docker)"
	@echo "make check-manifests  docker/kuberay/*.yaml against the Kubernetes and KubeRay CRD schemas (no cluster)"
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

# phantoms → lung U-Net → dataset cache (prepared with that U-Net) → the demo sweep (Optuna + ASHA)
demo: develop
	$(BIN)/cxr-sweep phantoms --out demo-output/phantoms --task ne --patients 150 --size 96
	$(BIN)/cxr-sweep segmenter train --images demo-output/phantoms/images \
		--masks demo-output/phantoms/lung_masks --out demo-output/lung_unet.pt --size 64 \
		--encoder resnet18 --depth 3 --decoder-channels 64,32,16 --epochs 6 --batch-size 16 --lr 3e-3
	$(BIN)/cxr-sweep prepare csv --csv demo-output/phantoms/labels.csv --task ne --out demo-output/cache/ne \
		--segmenter demo-output/lung_unet.pt --size 96 --data-access synthetic --overwrite
	$(BIN)/cxr-sweep sweep run search_spaces/demo.yaml --overwrite

lint: develop
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: develop
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The CPU set, under 10 minutes on 2 cores. The sweep-efficiency benchmark takes about 5 minutes
# more, so it runs on its own: $(BIN)/python benchmarks/sweep_efficiency.py (docs/performance.md).
bench: develop
	$(BIN)/python benchmarks/step_time.py --out benchmarks/results/step_time_cpu.json
	$(BIN)/python benchmarks/memory.py --out benchmarks/results/memory_cpu.json
	$(BIN)/python benchmarks/authors_baseline.py --threads 1 --out benchmarks/results/authors_baseline_cpu_1thread.json
	$(BIN)/python benchmarks/loader.py --out benchmarks/results/loader_cpu.json

# The GPU set on one CUDA device (docs/performance.md): step time (+ train.compile_attention),
# resnet50 profiles, the authors' baseline, data loading, torch.compile of the backbone body.
bench-gpu: develop
	PYTHON=$(BIN)/python bash benchmarks/gpu.sh benchmarks/results

# The shortcut benchmark (docs/results.md): CE vs paper vs soft/energy on phantoms with a spurious marker.
shortcut: develop
	$(BIN)/python benchmarks/shortcut.py --out benchmarks/results/shortcut_cpu.json \
		--markdown benchmarks/results/shortcut_cpu.md --montage docs/shortcut_cams.png

# The cluster stack's images (docker/Dockerfile; settings in docker/build.sh), and the stack brought up
# for real by tests/stack/ (a Docker daemon: .ci/setup.d/docker.sh installs and starts one as root)
images:
	bash docker/build.sh

stack-test: develop
	$(BIN)/python -m pytest tests/stack -v $(PYTEST_ARGS)

# The KubeRay manifests against the Kubernetes API schemas (kubernetes-validate) and KubeRay's CRDs
check-manifests: develop
	$(BIN)/python -m tests.kube_schemas docker/kuberay/*.yaml

clean:
	rm -rf demo-output .pytest_cache .ruff_cache *.egg-info
