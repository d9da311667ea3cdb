# Two commands for a fresh machine: `make demo` (fuse RepNeXt-M1, print before → after) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1 is the pair timm (zoo tests, benchmarks) works with on this machine kind.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-thorough bench clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q ".[all]" $(TORCH_PINS)
	touch $@

install: $(VENV)/.deps
	$(PY) -m pip install -q --no-deps -e .  # editable: tests and the demo run this tree

demo: install
	$(PY) -m examples.repnext.demo

test: install
	$(PY) -m pytest -n 2 -q

test-thorough: install
	HYPOTHESIS_PROFILE=thorough $(PY) -m pytest -n 2 -q

bench: install
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
