#!/usr/bin/env bash
# Issue-7 figures on one GPU: step-time split and Self-Flow / flow-matching ratio of the 625M
# MMDiT (bf16, batch 38 x 256 tokens) eager and with torch.compile, then trunk throughput.
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/train_step.py --preset 625m --device cuda --dtype bf16 --batch 38 --steps 10
timeout 240 python3 benchmarks/train_step.py --preset 625m --device cuda --dtype bf16 --batch 38 --steps 10 --compile
python3 benchmarks/trunk.py --device cuda --dtype bf16 --widths 1152 --lengths 256 1024 --batch 16 --repeats 10
