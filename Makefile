# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := $(shell grep '^torch==' constraints.txt | cut -d= -f3)
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128` installs a CUDA build instead.
TORCH_INDEX ?=

.PHONY: install demo test test-all lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and alone: any later install would otherwise pull a CUDA build (see docs/install.md)
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mmtok demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: install
	$(VENV)/bin/mmtok bench compressors

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
