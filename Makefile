# `make demo` and `make test` set up .venv on first use, then run.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so that
# resolving `torch` later never pulls the multi-GB CUDA build. Set TORCH_INDEX to a wheel
# index URL to take torch from there instead.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# The same Triton as the lent Hopper GPUs, so interpreter and compiled runs are comparable.
TRITON_VERSION ?= 3.6.0
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup test test-gpu demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif
	$(PY) -m pip install -q "triton==$(TRITON_VERSION)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# CPU suite: Triton kernels run under the interpreter at small shapes; GPU tests skip.
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not gpu"

# Compiled kernels at DeepSeek shapes, on a CUDA GPU.
test-gpu:
	$(PYTHON) -m pytest -q -m gpu

demo: setup
	$(VENV)/bin/dsquant demo

lint: setup
	$(VENV)/bin/ruff check dsquant kernels tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info
