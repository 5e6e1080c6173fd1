# Two commands on a fresh Linux machine with python3 >= 3.10:
#   make demo   set up .venv, then run `ringlinear demo` (trains, serves and reports on this machine)
#   make test   set up .venv, then lint and run the CPU test suite (what CI runs)
# torch comes for the machine: the CUDA build where `nvidia-smi` sees a GPU, the CPU build elsewhere.
# Override with TORCH_SPEC / TORCH_INDEX (e.g. TORCH_SPEC=torch==2.13.0 TORCH_INDEX= for a local wheel).

PYTHON ?= python3
VENV ?= .venv
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= torch>=2.11
ifeq ($(HAS_GPU),yes)
TORCH_INDEX ?=
else
TORCH_INDEX ?= --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
endif
BIN := $(VENV)/bin

.PHONY: demo test gpu-test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/ringlinear demo

lint: $(VENV)/.installed
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -m "not gpu"

gpu-test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV)
