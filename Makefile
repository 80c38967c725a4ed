# `make demo` and `make test` set up .venv on first use, then run.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so that
# resolving `torch` later never pulls the multi-GB CUDA build. Set TORCH_INDEX to a wheel
# index URL to take torch from there instead.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# The oldest Triton supported is the one on the lent Hopper GPUs, so interpreter and compiled runs are
# comparable; the kernels are also tested under the newest release, the one current torch brings.
TRITON_VERSION ?= 3.6.0
TRITON_LATEST ?= 3.9.0
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

# -P: the checkout must not be on sys.path, or its kernels/ folder hides Hugging Face's `kernels` package
# (tests/conftest.py drops it too, for a plain `python -m pytest`).
PYTEST = $(1)/bin/python -P -m pytest

.PHONY: setup test test-all test-triton-latest test-gpu demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(PY) -m pip install -q "triton==$(TRITON_VERSION)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# CPU suite: Triton kernels run under the interpreter at small shapes; GPU tests skip. Then the kernel
# tests again under the newest Triton, in a venv of their own.
test: setup
	TRITON_INTERPRET=1 $(call PYTEST,$(VENV)) -q -m "not gpu"
	$(MAKE) --no-print-directory test-triton-latest

test-triton-latest:
	$(MAKE) --no-print-directory setup VENV=$(VENV)-triton-latest TRITON_VERSION=$(TRITON_LATEST)
	TRITON_INTERPRET=1 $(call PYTEST,$(VENV)-triton-latest) -q -m "not gpu" tests/kernels tests/test_environment.py

# Compiled kernels at DeepSeek shapes, on a CUDA GPU; also from an uninstalled checkout.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu

demo: setup
	$(VENV)/bin/dsquant demo

lint: setup
	$(VENV)/bin/ruff check dsquant kernels tests benchmarks

clean:
	rm -rf $(VENV) $(VENV)-triton-latest build dist *.egg-info
