#!/usr/bin/env bash
# GPU smoke test and first throughput figures of the training loop (one GPU, bf16, NCCL):
#   1. the tiny preset trains, checkpoints and resumes on the GPU (bf16, ZeRO-2, then ZeRO-3);
#   2. the 625M MMDiT on image-sized tokens (batch 38 x 256 tokens): Self-Flow vs flow matching
#      step time, tokens/s and the student's forward+backward MFU.
# On a machine without the project's dependencies, wheels in .whl/ are installed to /tmp/site first.
# The lent GPU machines have torch and transformers but lack: deepspeed (build a py3 wheel with
# `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8`), hjson, pydantic + pydantic-core (cp312),
# annotated-types, typing-inspection, typing-extensions>=4.16, webdataset, braceexpand, diffusers,
# importlib-metadata (download with `pip download --no-deps --only-binary=:all: --python-version 3.12`).
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
for stage in 2 3; do
  run=/tmp/gpu_tiny_$stage
  python3 -m selfflow.cli train --config configs/train/tiny.yaml run_dir=$run steps=20 save_every=10 \
    deepspeed.bf16=true deepspeed.zero_stage=$stage tracking.enabled=false 2>&1 | grep -E "error|Error|resumed" || true
  python3 -m selfflow.cli train --config configs/train/tiny.yaml run_dir=$run steps=30 save_every=10 \
    deepspeed.bf16=true deepspeed.zero_stage=$stage tracking.enabled=false 2>&1 | grep -E "error|Error|resumed" || true
  python3 -c "import json,sys; r=[json.loads(l) for l in open('$run/metrics.jsonl')]; print('tiny zero-$stage steps', len(r), 'loss', round(r[0]['loss'],4), '->', round(r[-1]['loss'],4))"
done
python3 benchmarks/selfflow_vs_fm.py --config configs/train/625m_image.yaml --steps ${STEPS:-60} --peak-tflops 989 \
  save_every=1000000
