# pgolf — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build by default (the file on this machine); GPU machines use environment.yml instead.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test test-gpu lab-test gpu-wheels lab venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name pgolf --display-name "pgolf (.venv)" >/dev/null
	touch $(STAMP)

# The main job on the embedded default: sample corpus -> train (cpu-smoke, or baseline on a GPU)
# -> run directory under runs/ and a loss-curve figure under figures/.
run: $(STAMP)
	$(BIN)/python -m pgolf.lab.mainjob

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The notebooks in JupyterLab in a real browser: Debian's Chromium (installed here with apt when it is
# missing; needs root) driven by Playwright, which never downloads a browser of its own. Fails, never
# skips, without Chromium. Screenshots land in figures/.
CHROMIUM ?= /usr/bin/chromium
lab-test: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[browser]"
	test -x $(CHROMIUM) || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	  || { echo "lab-test: could not install Debian's chromium (apt-get needs root and the Debian mirror)" >&2; exit 1; }
	test -x $(CHROMIUM)
	$(BIN)/python -m pytest -q -m browser tests/browser

# GPU-only tests (run on a CUDA machine).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# Wheels the device H100 image lacks (cp312), for scripts/gpu_checks.sh (carry .whl).
GPU_WHEELS = zstandard==0.23.0 brotli==1.1.0 zpaq==0.3.7 python-minifier==2.11.3
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

lab: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[lab]"
	$(BIN)/jupyter lab --notebook-dir=notebooks

clean:
	rm -rf $(VENV) data/sample
