# pgolf — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# CPU installs come from the lock (pyproject's dependencies + every extra: dev, lab, browser; `make lock`);
# GPU machines use environment.yml instead (docs/dependencies.md).
LOCK   := requirements-cpu.lock
# torch's CPU build, which the lock pins (a plain resolve from PyPI would pull the CUDA build and its
# nvidia-* packages). This machine finds it in pip's find-links (/opt/wheels); elsewhere pass
# PIP_FLAGS="--extra-index-url https://download.pytorch.org/whl/cpu" (and the same to LOCK_FLAGS).
TORCH_CPU  ?= torch==2.13.0+cpu
LOCK_FLAGS ?= --find-links /opt/wheels
PIP_FLAGS  ?=

.PHONY: run test lint lock test-gpu lab-test gpu-wheels lab venv clean git-filter

venv: $(STAMP) git-filter

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
	echo "$(TORCH_CPU)" | $(BIN)/uv pip compile pyproject.toml - --extra dev --extra lab --extra browser --python-version 3.11 \
	  $(LOCK_FLAGS) --custom-compile-command "make lock" --quiet -o $(LOCK)

# The main job on the embedded default: sample corpus -> train (cpu-smoke, or baseline on a GPU)
# -> run directory under runs/ and a loss-curve figure under figures/.
run: $(STAMP) git-filter
	$(BIN)/python -m pgolf.lab.mainjob

test: $(STAMP) git-filter
	$(BIN)/python -m pytest -q

# ruff (style, pyflakes, bugbear) and mypy (types); settings in pyproject.toml. CI runs it before the tests.
lint: $(STAMP)
	$(BIN)/ruff check pgolf scripts tests
	$(BIN)/mypy pgolf scripts

# The notebooks in JupyterLab in a real browser: Debian's Chromium (installed here with apt when it is
# missing; needs root) driven by Playwright, which never downloads a browser of its own. Fails, never
# skips, without Chromium. Screenshots land in figures/.
CHROMIUM ?= /usr/bin/chromium
lab-test: $(STAMP)
	test -x $(CHROMIUM) || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	  || { echo "lab-test: could not install Debian's chromium (apt-get needs root and the Debian mirror)" >&2; exit 1; }
	test -x $(CHROMIUM)
	$(BIN)/python -m pytest -q -m browser tests/browser

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

lab: $(STAMP) git-filter
	$(BIN)/jupyter lab --notebook-dir=notebooks

# Notebooks reach commits without outputs: the clean filter scripts/nbstrip.py (named for *.ipynb in
# .gitattributes) strips them when a notebook is staged, so one run and saved in JupyterLab shows no
# change in `git diff` and `git add` stages nothing. Installed into this clone's git config by venv, run,
# test and lab.
git-filter:
	@if git rev-parse --git-dir >/dev/null 2>&1; then git config filter.nbstrip.clean "$(PYTHON) scripts/nbstrip.py"; fi

clean:
	rm -rf $(VENV) data/sample
