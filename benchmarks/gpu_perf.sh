#!/usr/bin/env bash
# The GPU figures of the performance targets, on a machine with one GPU, in parts that each fit a short
# device lease (name the parts to run; default: all, in this order, each under its own time limit):
#   trunk  per-token / scalar-t forward ratio of both trunks at width 1152, compiled, bf16 (target 1);
#          activation memory with and without per-block checkpointing
#   step   the 625M MMDiT training step (bf16, batch 38 x 256 image tokens, compiled): time split with
#          EMA and data, Self-Flow / flow-matching ratio, student and whole-step MFU (targets 3-5)
#   loop   the real `selfflow train` loop on the 625M image preset, Self-Flow then flow matching: the
#          step's data time (host wait for the batch, read ahead) and step times (target 2)
#   video  the paper's video shape (12 x 12 x 20 Wan2.2 tokens, batch 8): the step figures compiled, then
#          peak memory with and without activation checkpointing (target 6)
#   audio  the same for the audio shape (250 Oobleck tokens, batch 16)
#   sample sampling throughput of SiT-XL/2 (50-step ODE, 250-step SDE, CFG 1.5 as a doubled batch)
#     bash benchmarks/gpu_perf.sh             # everything (about 15 min of GPU time, not measured as a whole)
#     bash benchmarks/gpu_perf.sh step loop   # some parts
# Wheels in .whl/ (see gpu_check.sh) are installed to /tmp/site first when present.
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$name" in *PCIe*) peak=756 ;; *) peak=989 ;; esac  # dense bf16 TFLOP/s: H100 PCIe; H100 SXM and H200
echo "$name (peak $peak TFLOP/s dense bf16)"
step="benchmarks/train_step.py --preset 625m --device cuda --dtype bf16 --steps 10 --peak-tflops $peak"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(trunk step loop video audio sample)
for part in "${parts[@]}"; do
  echo "== $part ($(date -u +%H:%M:%S))"
  case "$part" in
    trunk) timeout 150 python3 benchmarks/trunk.py --device cuda --dtype bf16 --compile --widths 1152 --lengths 256 --batch 16 ;;
    step) timeout 210 python3 $step --batch 38 --compile ;;
    loop) timeout 240 python3 benchmarks/selfflow_vs_fm.py --config configs/train/625m_image.yaml --steps 40 \
      --peak-tflops "$peak" save_every=1000000 ;;
    video)
      timeout 240 python3 $step --shape video --batch 8 --compile
      timeout 120 python3 $step --shape video --batch 8 --methods selfflow --steps 3
      timeout 120 python3 $step --shape video --batch 8 --methods selfflow --steps 3 --grad-checkpointing ;;
    audio)
      timeout 180 python3 $step --shape audio --batch 16 --compile
      timeout 90 python3 $step --shape audio --batch 16 --methods selfflow --steps 3
      timeout 90 python3 $step --shape audio --batch 16 --methods selfflow --steps 3 --grad-checkpointing ;;
    sample) timeout 90 python3 benchmarks/sampling.py --model xl --device cuda --dtype bf16 --batch 64 --cfg-scale 1.5 ;;
    *) echo "unknown part $part (trunk step loop video audio sample)" >&2; exit 2 ;;
  esac
done
