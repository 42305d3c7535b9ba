"""Run under torchrun: a checkpoint saved by N processes resumes on M (`Engine.load` of its universal copy).

    torchrun --nproc-per-node N tests/distributed/resize_check.py save STAGE DIR
    torchrun --nproc-per-node M tests/distributed/resize_check.py load STAGE DIR

Every step trains on one global batch of 4 seeded by the step, each rank taking its slice (the loss is
a per-sample mean, so the averaged gradient is the same for any number of ranks). `save` takes 3
steps, saves, takes step 4 and records the full fp32 weights after steps 3 and 4. `load` converts the
checkpoint (ZeRO 1-3; ZeRO-0 files load as they are), loads it, and checks: the weights equal step
3's bit for bit, and after step 4 on the same global batch they equal step 4's within float
round-off (Adam moments, step count and hyperparameters all enter that step: a wrong moment or
bias correction moves it by percents of the step). Exits non-zero on a mismatch.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.training.engine import DeepSpeedConfig, Engine, barrier, init_distributed, shutdown, to_universal

GLOBAL_BATCH = 4


def train_step(engine: Engine, step: int, rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x, t = torch.randn(GLOBAL_BATCH, 16, 16, generator=gen), torch.rand(GLOBAL_BATCH, generator=gen)
    txt = torch.randn(GLOBAL_BATCH, 3, 32, generator=gen)
    ids = torch.zeros(GLOBAL_BATCH, 16, 4, dtype=torch.long)
    ids[..., 0] = torch.arange(16)
    part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    out = engine.module.forward_with_features(x[part], t[part], ids[part], txt=txt[part], modality="image", layer=2)
    engine.backward(out.velocity.pow(2).mean() + out.features.pow(2).mean())
    assert engine.step(), "the step was not applied"


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    with engine.gathered():
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def main(phase: str, stage: int, folder: Path) -> None:
    info = init_distributed()
    torch.manual_seed(0)
    cfg = MMDiTConfig.tiny()
    cfg.projector_dim = 64
    cfg.modalities = {"image": [16, 16]}
    engine = Engine.create(
        build_mmdit(cfg), DeepSpeedConfig(zero_stage=stage, bf16=False), GLOBAL_BATCH // info.world, info.device, 1e-2
    )
    checkpoint = folder / "step_3"
    if phase == "save":
        for step in range(3):
            train_step(engine, step, info.rank, info.world)
        assert not engine.save(checkpoint, client_state={"step": 3})
        at3 = weights(engine)
        train_step(engine, 3, info.rank, info.world)
        if info.rank == 0:
            save_file(at3, str(folder / "at3.safetensors"))
            save_file(weights(engine), str(folder / "at4.safetensors"))
        else:
            weights(engine)  # collective under ZeRO-3
        shutdown()
        return
    source = checkpoint
    if stage > 0:
        source = folder / "universal" / "step_3"
        if info.rank == 0:
            to_universal(checkpoint, source)
        barrier()
    engine.load(source, universal=stage > 0)
    at3, at4 = load_file(str(folder / "at3.safetensors")), load_file(str(folder / "at4.safetensors"))
    loaded = weights(engine)
    exact = all(torch.equal(loaded[n], at3[n]) for n in at3)
    train_step(engine, 3, info.rank, info.world)
    stepped = weights(engine)
    error = max((stepped[n] - at4[n]).abs().max().item() for n in at4)
    moved = max((at4[n] - at3[n]).abs().max().item() for n in at4)
    said = f"loaded weights exact {exact}, step 4 error {error:.2e} of a step {moved:.2e}"
    print(f"rank {info.rank} of {info.world}, zero-{stage}: {said}")
    shutdown()
    if not (exact and error < 1e-5 and moved > 1e-3):
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
