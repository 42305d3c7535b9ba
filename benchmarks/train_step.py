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
"""

import argparse
import copy
import dataclasses
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.flow.paths import TimestepConfig
from selfflow.modalities.grid import image_ids
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


class Clock:
    def __init__(self, device: torch.device):
        self.device, self.totals = device, defaultdict(float)

    def lap(self, name: str, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[name] += now - start
        return now


def run(method: str, args, device, dtype) -> tuple[dict, float, int]:
    model_cfg, objective, side = preset(args.preset)
    objective = dataclasses.replace(objective, method=method)
    torch.manual_seed(0)
    student = build_mmdit(model_cfg, device).to(dtype)
    teacher = copy.deepcopy(student).float().requires_grad_(False)
    in_dim = model_cfg.modalities["image"][0]
    x0 = torch.randn(args.batch, side * side, in_dim, device=device)
    ids = image_ids(args.batch, side, side, device)
    gen = torch.Generator().manual_seed(0)
    flops = student_flops(student, objective, x0, ids, gen, dtype)
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
            return student(x.to(dtype), t, ids).float()
        out = student.forward_with_features(x.to(dtype), t, ids, layer=layer)
        return out.velocity.float(), out.features.float()

    def teacher_fn(x, t, layer):
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            h = teacher.hidden_states(x, t, ids, layer=layer).float()
        clock.lap("teacher fwd", start)
        return h

    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            clock.totals.clear()
        start = time.perf_counter()
        noised = noise_batch(x0, TimestepConfig("logit_normal"), 0.25, objective, gen)
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
    return totals, objective.teacher_layer / model_cfg.depth, flops


def student_flops(student, objective: ObjectiveConfig, x0, ids, gen, dtype) -> int:
    """FLOPs of the student's forward (with its feature tap for Self-Flow) + backward on one batch."""
    noised = noise_batch(x0, TimestepConfig("logit_normal"), 0.25, objective, gen)
    with FlopCounterMode(display=False) as counter:
        if objective.method == "selfflow":
            x, layer = noised.x_student.to(dtype), objective.student_layer
            out = student.forward_with_features(x, noised.tau, ids, layer=layer)
            (out.velocity.float().sum() + out.features.float().sum()).backward()
        else:
            student(noised.x_student.to(dtype), noised.tau, ids).float().sum().backward()
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
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    results = {m: run(m, args, device, dtype) for m in ("selfflow", "fm")}
    steps = {m: sum(split.values()) for m, (split, *_) in results.items()}
    tokens = args.batch * preset(args.preset)[2] ** 2
    for method, (split, _, flops) in results.items():
        parts = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in split.items())
        print(f"{method:8s} step {1e3 * steps[method]:.1f} ms ({args.batch / steps[method]:.1f} samples/s): {parts}")
        fwd_bwd = split["student fwd+bwd"]
        line = f"{method:8s} student fwd+bwd: {flops / 1e12:.2f} TFLOP per step, {tokens / fwd_bwd:.0f} tokens/s"
        line += f", {flops / fwd_bwd / 1e9:.1f} GFLOP/s"
        if args.peak_tflops:
            achieved = flops / fwd_bwd / 1e12
            line += f", {achieved:.1f} TFLOP/s = {100 * achieved / args.peak_tflops:.1f}% MFU"
        print(line)
    depth_share = results["selfflow"][1]
    print(
        f"Self-Flow / flow matching step time: {steps['selfflow'] / steps['fm']:.3f} "
        f"(target <= 1 + (k/depth)/3 + 0.05 = {1 + depth_share / 3 + 0.05:.3f})"
    )


if __name__ == "__main__":
    main()
