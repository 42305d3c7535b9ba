"""Trunk throughput: tokens/s of forward and forward + backward for the SiT and MMDiT trunks.

For each trunk, width and sequence length it prints tokens/s (forward with scalar `t`, forward
with per-token `t` holding two distinct values per sample as dual-timestep training makes, given
as a dense `(B, L)` tensor (rows found by `torch.unique`, a host sync on a GPU) and as
`TwoTimesteps(t, s, mask)` (what training passes: fixed rows, no sync), and forward + backward),
the per-token / scalar forward-time ratios (target <= 1.05), the
activation memory saved for backward with and without per-block activation checkpointing
(summed over autograd's saved tensors, so it is exact on any device), and on CUDA the peak
allocated memory.

    python benchmarks/trunk.py                                   # CPU: small widths, fp32
    python benchmarks/trunk.py --device cuda --dtype bf16 --compile --widths 1152 --lengths 256 1024
"""

import argparse
import statistics
import time
from dataclasses import replace

import torch

from selfflow.backbone.layers import TwoTimesteps
from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.backbone.sit import SiT, SiTConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(kind: str, width: int, length: int, checkpointing: bool, device, dtype):
    heads = max(width // 64, 1)
    if kind == "sit":
        side = int(length**0.5) * 2  # patch 2
        cfg = SiTConfig(input_size=side, hidden_size=width, num_heads=heads, depth=8, num_classes=11)
        model = SiT(replace(cfg, grad_checkpointing=checkpointing))
        model.init_weights()
    else:
        head_dim = width // heads
        axes = [head_dim - 2 * (head_dim // 3 // 2 * 2), head_dim // 3 // 2 * 2, head_dim // 3 // 2 * 2]
        cfg = MMDiTConfig(
            hidden_size=width,
            num_heads=heads,
            depth_double=3,
            depth_single=5,
            axes_dim=axes,
            context_dim=0,
            modalities={"image": [64, 64]},
            grad_checkpointing=checkpointing,
        )
        model = build_mmdit(cfg)
    # non-zero modulation, so the timing covers real work (zero-initialised gates are no different in cost)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.to(device=device, dtype=dtype), cfg


def inputs(kind, cfg, batch: int, length: int, device, dtype):
    gen = torch.Generator().manual_seed(0)
    if kind == "sit":
        x = torch.randn(batch, cfg.grid**2, cfg.token_dim, generator=gen)
        extra = {"y": torch.zeros(batch, dtype=torch.long, device=device)}
    else:
        x = torch.randn(batch, length, 64, generator=gen)
        ids = torch.zeros(batch, length, 4, dtype=torch.long)
        ids[..., 1], ids[..., 2] = torch.arange(length) // 16, torch.arange(length) % 16
        extra = {"ids": ids.to(device)}
    t = torch.rand(batch, generator=gen)
    s = torch.rand(batch, generator=gen)
    mask = torch.rand(batch, x.shape[1], generator=gen) < 0.25
    two = TwoTimesteps(t.to(device), s.to(device), mask.to(device))  # two distinct values per sample
    return x.to(device, dtype), t.to(device), two, extra


def call(model, kind, x, t, extra):
    if kind == "sit":
        return model(x, t, extra["y"])
    return model(x, t, extra["ids"])


def paired(fns, device, repeats: int) -> list[float]:
    """Median seconds per call of each function, calls interleaved so drifting machine load
    (a shared VM's neighbours, page-fault storms) hits every function alike."""
    for fn in fns * 2:  # warm-up (and compilation)
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
    return [statistics.median(out) for out in times]


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def saved_bytes(model, kind, x, t, extra) -> int:
    """Bytes autograd keeps for backward (activation memory) in one forward."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call(model, kind, x, t, extra).float().square().mean().backward()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"device {device} dtype {args.dtype} compile {args.compile} batch {args.batch}")
    header = "trunk  width  tokens  fwd tok/s  dense-t tok/s  two-t tok/s  dense/scalar  two/scalar"
    print(header + "  fwd+bwd tok/s  saved MB  ckpt MB  peak MB")
    for kind in ("sit", "mmdit"):
        for width in args.widths:
            for length in args.lengths:
                print(measure(kind, width, length, args, device, dtype))


def measure(kind: str, width: int, length: int, args, device, dtype) -> str:
    model, cfg = build(kind, width, length, False, device, dtype)
    x, t, two, extra = inputs(kind, cfg, args.batch, length, device, dtype)
    t_token = two.dense()
    if args.compile:
        for block in getattr(model, "blocks", None) or [*model.double_blocks, *model.single_blocks]:
            block.compile()
    n = x.shape[0] * x.shape[1]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        scalar, token, rows = paired(
            [
                lambda: call(model, kind, x, t, extra),
                lambda: call(model, kind, x, t_token, extra),
                lambda: call(model, kind, x, two, extra),
            ],
            device,
            args.repeats,
        )
    train = timed(lambda: call(model, kind, x, two, extra).float().square().mean().backward(), device, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    saved = saved_bytes(model, kind, x, t_token, extra) / 2**20
    ckpt_model, _ = build(kind, width, length, True, device, dtype)
    ckpt = saved_bytes(ckpt_model, kind, x, t_token, extra) / 2**20
    return (
        f"{kind:6s} {width:5d} {x.shape[1]:7d} {n / scalar:10.0f} {n / token:12.0f} {n / rows:10.0f} "
        f"{token / scalar:11.3f} {rows / scalar:9.3f} {n / train:14.0f} {saved:9.1f} {ckpt:8.1f} {peak:8.1f}"
    )


if __name__ == "__main__":
    main()
