"""Sampling throughput: samples/s of the SiT trunk for the 50-step ODE and the 250-step SDE.

Runs `selfflow.flow.samplers.sample` exactly as `selfflow sample` does (per-sample noise
streams, classifier-free guidance as a doubled batch when `--cfg-scale` > 1) on a randomly
initialised trunk, without the VAE decode, and prints samples/s, trunk forward calls per
sample and the time per forward call.

    python benchmarks/sampling.py                          # small SiT on CPU, fp32
    python benchmarks/sampling.py --model xl --device cuda --dtype bf16 --batch 64 --cfg-scale 1.5
"""

import argparse
import time

import torch

from selfflow.backbone.sit import SiT, SiTConfig
from selfflow.flow.samplers import PerSampleNoise, SamplerConfig, sample

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(name: str, device, dtype, compile_blocks: bool) -> SiT:
    if name == "xl":
        cfg = SiTConfig.xl_2()
    else:  # SiT-S/2-like on 16x16x4 latents: what this CPU can sample in seconds
        cfg = SiTConfig(input_size=16, hidden_size=384, depth=12, num_heads=6, num_classes=1001)
    model = SiT(cfg)
    model.init_weights()
    for p in model.parameters():  # non-zero gates, so every block does real work
        p.data.normal_(0, 0.02)
    model = model.to(device=device, dtype=dtype).eval()
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    return model


def run(model: SiT, sampler: SamplerConfig, batch: int, device, dtype) -> tuple[float, int]:
    """Seconds for one batch and the number of trunk calls it made."""
    cfg = model.cfg
    noise_source = PerSampleNoise(list(range(batch)))
    noise = torch.stack([torch.randn(cfg.grid**2, cfg.token_dim, generator=g) for g in noise_source.generators])
    labels = torch.arange(batch) % (cfg.num_classes - 1)
    calls = 0

    def model_fn(x, t, y):
        nonlocal calls
        calls += 1
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(x.to(dtype), t, y).float()

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        sample(model_fn, noise.to(device), labels.to(device), sampler, cfg.null_class, noise_source)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["small", "xl"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--ode", choices=["euler", "heun"], default="euler")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build(args.model, device, dtype, args.compile)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"SiT {args.model} ({params:.0f}M params, {model.cfg.grid**2} tokens)")
    print(f"device {device} dtype {args.dtype} compile {args.compile} batch {args.batch} cfg {args.cfg_scale}")
    print("sampler       steps  samples/s  trunk calls  ms/call")
    for kind, steps in ((args.ode, 50), ("sde", 250)):
        sampler = SamplerConfig(kind=kind, num_steps=steps, cfg_scale=args.cfg_scale)
        run(model, SamplerConfig(kind=kind, num_steps=4 if kind == "sde" else 2), args.batch, device, dtype)  # warm-up
        seconds, calls = run(model, sampler, args.batch, device, dtype)
        print(f"{kind:12s} {steps:6d} {args.batch / seconds:10.2f} {calls:12d} {1e3 * seconds / calls:8.1f}")


if __name__ == "__main__":
    main()
