# pgolf — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# CPU installs come from the lock (pyproject's dependencies + the dev extra, resolved by `make lock`);
# GPU machines use environment.yml instead (docs/dependencies.md).
LOCK   := requirements-cpu.lock
# torch's CPU build, which the lock pins (a plain resolve from PyPI would pull the CUDA build and its
# nvidia-* packages). This machine finds it in pip's find-links (/opt/wheels); elsewhere pass
# PIP_FLAGS="--extra-index-url https://download.pytorch.org/whl/cpu" (and the same to LOCK_FLAGS).
TORCH_CPU  ?= torch==2.13.0+cpu
LOCK_FLAGS ?= --find-links /opt/wheels
PIP_FLAGS  ?=

.PHONY: run test lint lock test-gpu gpu-wheels lab venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_FLAGS) -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check || { echo "pyproject.toml needs what $(LOCK) lacks? run: make lock"; exit 1; }
	$(BIN)/python -m ipykernel install --sys-prefix --name pgolf --display-name "pgolf (.venv)" >/dev/null
	touch $(STAMP)

# Re-resolve the lock from pyproject.toml (after adding or changing a dependency), then `make venv`.
# Needs only uv (a dev dependency), so it works while the venv lags behind a changed pyproject.toml.
lock:
	test -x $(BIN)/uv || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); $(BIN)/python -m pip install -q uv; }
	echo "$(TORCH_CPU)" | $(BIN)/uv pip compile pyproject.toml - --extra dev --python-version 3.11 \
	  $(LOCK_FLAGS) --custom-compile-command "make lock" --quiet -o $(LOCK)

# The main job on the embedded default: sample corpus -> train (cpu-smoke, or baseline on a GPU)
# -> run directory under runs/ and a loss-curve figure under figures/.
run: $(STAMP)
	$(BIN)/python -m pgolf.lab.mainjob

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff (style, pyflakes, bugbear) and mypy (types); settings in pyproject.toml. CI runs it before the tests.
lint: $(STAMP)
	$(BIN)/ruff check pgolf scripts tests
	$(BIN)/mypy pgolf scripts

# GPU-only tests (run on a CUDA machine).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# Wheels the device H100 image lacks (cp312), for scripts/gpu_checks.sh (carry .whl), at the lock's versions
# (python-minifier's version changes the counted code bytes). FlashAttention has no binary wheel on PyPI
# (FA2 ships a source tarball, FA3 is built from hopper/): pass a prebuilt cp312 / CUDA 12 / torch-matched
# one as FA_WHEELS=path.whl to carry it too; without one the device runs FlexAttention, and every result
# names the kernel that ran (`attention_backend`).
GPU_WHEELS = $(shell grep -E '^(zstandard|brotli|zpaq|python-minifier)==' $(LOCK))
FA_WHEELS ?=
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(if $(FA_WHEELS),cp $(FA_WHEELS) .whl/)

lab: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[lab]"
	$(BIN)/jupyter lab --notebook-dir=notebooks

clean:
	rm -rf $(VENV) data/sample
