"""Where a training step's time goes, for Self-Flow and for vanilla flow matching on one model and batch.

Re-enacts the training step on one device with plain PyTorch (the objective, the EMA update and
AdamW of `selfflow.training`, no DeepSpeed) and times each phase with device synchronisation:
data (noising), student forward + backward, teacher forward, EMA update, optimizer. Prints
samples/s, the split, and the Self-Flow / flow-matching step-time ratio next to the target
`1 + (k / depth) / 3 + 0.05`.

Model FLOPs of the student's forward + backward are counted by `torch.utils.flop_counter`
on one real step (matmuls `2mnk` forward and `4mnk` backward, SDPA `4 B H L^2 Dh` forward and
2.5x that backward; the per-row modulation linears count too, at R rows); with `--peak-tflops`
the benchmark prints tokens/s and the model FLOPs utilisation of the student's forward + backward.

    python benchmarks/train_step.py                                     # tiny MMDiT on CPU
    python benchmarks/train_step.py --preset demo --batch 32            # the demo's trunk and image batch
    python benchmarks/train_step.py --preset 625m --device cuda --dtype bf16 --batch 38 --compile --peak-tflops 989

`--shape video` / `--shape audio` put the paper's other token grids through the same trunk: Wan2.2
latents of 45 frames at 192 x 320 (12 x 12 x 20 tokens of 48 channels, mask ratio 0.10;
configs/data/prepare_wan.yaml) and Oobleck latents of 10 s (250 tokens of 64 channels, mask ratio
0.50; configs/data/prepare_oobleck.yaml), with the paper's batches 8 and 16 as `--batch`. On a GPU the
peak memory of each method's steps is printed; `--grad-checkpointing` recomputes every block's
activations in backward (compare the two peaks; the FLOPs counted then include the recomputed
forward, about 1.33x, so take MFU from runs without it). The whole-step MFU counts the teacher's forward
(to block k) as useful work beside the student's forward + backward.
"""

import argparse
import copy
import dataclasses
import time
from collections import defaultdict
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.flow.paths import TimestepConfig
from selfflow.modalities.grid import grid_ids, image_ids
from selfflow.training.objective import ObjectiveConfig, noise_batch, training_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def preset(name: str) -> tuple[MMDiTConfig, ObjectiveConfig, int]:
    """Model, objective and token grid side of a preset."""
    if name == "625m":
        return MMDiTConfig(projector_dim=1152, context_dim=0), ObjectiveConfig(student_layer=6, teacher_layer=15), 16
    if name == "demo":  # configs/train/demo.yaml's trunk on the demo's image tokens (8 x 8 patches of 48 values)
        cfg = MMDiTConfig(hidden_size=128, num_heads=4, depth_double=2, depth_single=4, axes_dim=[8, 12, 12])
        cfg.context_dim, cfg.projector_dim, cfg.modalities = 0, 128, {"image": [48, 48]}
        return cfg, ObjectiveConfig(student_layer=2, teacher_layer=5), 8
    cfg = MMDiTConfig(hidden_size=256, num_heads=4, depth_double=2, depth_single=6, axes_dim=[20, 22, 22])
    cfg.context_dim, cfg.projector_dim, cfg.modalities = 0, 256, {"image": [64, 64]}
    return cfg, ObjectiveConfig(student_layer=2, teacher_layer=6), 16


# The paper's video and audio token grids (t, h, w), token width and mask ratio (configs/train/625m_mixed.yaml)
SHAPES = {"video": ((12, 12, 20), 48, 0.10), "audio": ((250, 1, 1), 64, 0.50)}
IMAGE_MASK_RATIO = 0.25  # the paper's image mask ratio


def tokens_of(shape: str, width: int, side: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Clean tokens `(B, L, width)` of `shape` (image: the preset's side x side grid), their ids and mask ratio."""
    if shape == "image":
        ids, ratio = image_ids(batch, side, side, device), IMAGE_MASK_RATIO
    else:
        grid, _, ratio = SHAPES[shape]
        ids = grid_ids(batch, *grid, device)
    return torch.randn(batch, ids.shape[1], width, device=device), ids, ratio


class Clock:
    def __init__(self, device: torch.device):
        self.device, self.totals = device, defaultdict(float)

    def lap(self, name: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[name] += now - start
        return now


class Result(NamedTuple):
    split: dict  # seconds per step of each phase
    depth_share: float  # k / depth: the teacher's share of the trunk
    student_flops: int  # the student's forward (+ feature tap) + backward on one batch
    teacher_flops: int  # the teacher's forward to block k (0 for flow matching)
    tokens: int  # data tokens per step
    peak_mb: float  # CUDA peak memory of the timed steps (nan on CPU)


def run(method: str, args, device, dtype) -> Result:
    model_cfg, objective, side = preset(args.preset)
    model_cfg.grad_checkpointing = args.grad_checkpointing
    objective = dataclasses.replace(objective, method=method)
    torch.manual_seed(0)
    modality = args.shape
    if modality != "image":  # the trunk with this modality's projections only
        width = SHAPES[modality][1]
        model_cfg.modalities = {modality: [width, width]}
    x0, ids, mask_ratio = tokens_of(modality, model_cfg.modalities[modality][0], side, args.batch, device)
    student = build_mmdit(model_cfg, device).to(dtype)
    teacher = copy.deepcopy(student).float().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    noised = noise_batch(x0, TimestepConfig("logit_normal"), mask_ratio, objective, gen)
    flops = student_flops(student, objective, noised, ids, modality, dtype)
    teacher_flops = 0
    if method == "selfflow":
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            teacher.hidden_states(
                noised.x_teacher, noised.tau_teacher, ids, modality=modality, layer=objective.teacher_layer
            )
        teacher_flops = counter.get_total_flops()
    if args.compile:
        for trunk in (student, teacher):
            for block in [*trunk.double_blocks, *trunk.single_blocks]:
                block.compile(mode=args.compile_mode)
    params = list(student.parameters())
    teacher_params = list(teacher.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    clock = Clock(device)
    bf16 = dtype == torch.bfloat16 and device.type == "cuda"

    def student_fn(x, t, layer):
        if layer is None:
            return student(x.to(dtype), t, ids, modality=modality).float()
        out = student.forward_with_features(x.to(dtype), t, ids, modality=modality, layer=layer)
        return out.velocity.float(), out.features.float()

    def teacher_fn(x, t, layer):
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            h = teacher.hidden_states(x, t, ids, modality=modality, layer=layer).float()
        clock.lap("teacher fwd", start)
        return h

    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            clock.totals.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        noised = noise_batch(x0, TimestepConfig("logit_normal"), mask_ratio, objective, gen)
        start = clock.lap("data", start)
        terms = training_loss(objective, x0, noised, student_fn, teacher_fn)
        terms.total.backward()
        now = clock.lap("student fwd+bwd (+teacher)", start)
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = clock.lap("optimizer", now)
        if method == "selfflow":
            with torch.no_grad():
                torch._foreach_lerp_(teacher_params, [p.detach().float() for p in params], 1e-4)
            clock.lap("ema", now)
    totals = {k: v / args.steps for k, v in clock.totals.items()}
    totals["student fwd+bwd"] = totals.pop("student fwd+bwd (+teacher)") - totals.get("teacher fwd", 0.0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    tokens = x0.shape[0] * x0.shape[1]
    return Result(totals, objective.teacher_layer / model_cfg.depth, flops, teacher_flops, tokens, peak)


def student_flops(student, objective: ObjectiveConfig, noised, ids, modality: str, dtype) -> int:
    """FLOPs of the student's forward (with its feature tap for Self-Flow) + backward on one batch."""
    with FlopCounterMode(display=False) as counter:
        x = noised.x_student.to(dtype)
        if objective.method == "selfflow":
            out = student.forward_with_features(x, noised.tau, ids, modality=modality, layer=objective.student_layer)
            (out.velocity.float().sum() + out.features.float().sum()).backward()
        else:
            student(x, noised.tau, ids, modality=modality).float().sum().backward()
    student.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("small", "demo", "625m"), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for the MFU figure")
    parser.add_argument("--shape", choices=("image", *SHAPES), default="image", help="token grid (see above)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--methods", nargs="+", choices=("selfflow", "fm"), default=["selfflow", "fm"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(
        f"preset {args.preset}, {args.shape} tokens, batch {args.batch}, {args.dtype}, compile {args.compile}, "
        f"activation checkpointing {args.grad_checkpointing}, {device}"
    )
    results = {m: run(m, args, device, dtype) for m in args.methods}
    for method, res in results.items():
        step = sum(res.split.values())
        parts = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in res.split.items())
        print(f"{method:8s} step {1e3 * step:.1f} ms ({args.batch / step:.1f} samples/s, {res.tokens} tokens): {parts}")
        fwd_bwd = res.split["student fwd+bwd"]
        line = f"{method:8s} student fwd+bwd: {res.student_flops / 1e12:.4g} TFLOP per step"
        line += f", {res.tokens / fwd_bwd:.0f} tokens/s, {res.student_flops / fwd_bwd / 1e9:.1f} GFLOP/s"
        if args.peak_tflops:
            achieved = res.student_flops / fwd_bwd / 1e12
            line += f", {achieved:.1f} TFLOP/s = {100 * achieved / args.peak_tflops:.1f}% MFU"
        print(line)
        useful = res.student_flops + res.teacher_flops
        line = f"{method:8s} whole step (student fwd+bwd + teacher fwd {res.teacher_flops / 1e12:.4g} TFLOP): "
        line += f"{useful / step / 1e12:.4g} TFLOP/s"
        if args.peak_tflops:
            line += f" = {100 * useful / step / 1e12 / args.peak_tflops:.1f}% MFU"
        print(line + f"; peak memory {res.peak_mb:.0f} MiB")
    if len(results) == 2:
        steps = {m: sum(res.split.values()) for m, res in results.items()}
        share = results["selfflow"].depth_share
        print(
            f"Self-Flow / flow matching step time: {steps['selfflow'] / steps['fm']:.3f} "
            f"(targets: <= 1 + (k/depth)/3 + 0.05 = {1 + share / 3 + 0.05:.3f}; <= 1.20 on the 625M preset)"
        )


if __name__ == "__main__":
    main()
