#!/usr/bin/env bash
# Issue-7 figures on one GPU, in one run that fits a short device lease:
#   1. the 625M MMDiT training step (bf16, batch 38 x 256 tokens, torch.compile): time split,
#      Self-Flow / flow-matching ratio, tokens/s and MFU of the student's forward + backward;
#   2. sampling throughput of SiT-XL/2 (50-step ODE, 250-step SDE, CFG 1.5 as a doubled batch);
#   3. per-token / scalar-t forward ratio of both trunks at width 1152, compiled.
# Wheels in .whl/ (see gpu_check.sh) are installed to /tmp/site first when present.
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$name" in *PCIe*) peak=756 ;; *) peak=989 ;; esac  # dense bf16 TFLOP/s: H100 PCIe; H100 SXM and H200
echo "$name (peak $peak TFLOP/s dense bf16)"
timeout 210 python3 benchmarks/train_step.py --preset 625m --device cuda --dtype bf16 --batch 38 --steps 10 \
  --compile --peak-tflops "$peak"
timeout 90 python3 benchmarks/sampling.py --model xl --device cuda --dtype bf16 --batch 64 --cfg-scale 1.5
timeout 150 python3 benchmarks/trunk.py --device cuda --dtype bf16 --compile --widths 1152 --lengths 256 --batch 16
