"""Run under torchrun (2 processes): the gathered EMA equals an EMA computed independently.

    torchrun --nproc-per-node 2 tests/distributed/ema_check.py STAGE

Trains a tiny two-modality MMDiT for a few steps; after every optimizer step the reference
EMA is updated in fp32 from the gathered student weights with the textbook formula, and at
the end it is compared with the engine's EMA (gathered from shards under ZeRO-3). Exits
non-zero on a mismatch.
"""

import sys

import torch

from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.training.engine import DeepSpeedConfig, EMATeacher, Engine, fresh_copy, init_distributed, shutdown

DECAY = 0.9


def main(stage: int) -> None:
    info = init_distributed()
    torch.manual_seed(0)
    cfg = MMDiTConfig.tiny()
    cfg.projector_dim = 64
    cfg.modalities = {"image": [16, 16], "audio": [8, 8]}
    model = build_mmdit(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    teacher_copy = fresh_copy(model)
    initial = {n: p.detach().clone() for n, p in teacher_copy.named_parameters()}
    engine = Engine.create(model, DeepSpeedConfig(zero_stage=stage, bf16=False), 4, info.device, lr=1e-2)
    ema = EMATeacher.create(engine, teacher_copy)
    with engine.gathered():
        reference = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    gen = torch.Generator().manual_seed(100 + info.rank)
    for step in range(5):
        modality = "image" if step % 2 == 0 else "audio"
        dim, length = (16, 16) if modality == "image" else (8, 6)
        x = torch.randn(4, length, dim, generator=gen)
        ids = torch.zeros(4, length, 4, dtype=torch.long)
        ids[..., 0] = torch.arange(length)
        t = torch.rand(4, generator=gen)
        out = engine.module.forward_with_features(
            x, t, ids, txt=torch.randn(4, 3, 32, generator=gen), modality=modality, layer=2
        )
        loss = out.velocity.pow(2).mean() + out.features.pow(2).mean()  # Engine.backward adds ZeRO-3's zero term
        engine.backward(loss)
        engine.step()
        ema.update(DECAY)
        with engine.gathered():
            for name, p in engine.module.named_parameters():
                reference[name] = DECAY * reference[name] + (1 - DECAY) * p.detach().float()
    gathered = ema.state_dict()
    assert sorted(gathered) == sorted(reference), "EMA and model parameter names differ"
    worst = max((gathered[n] - reference[n]).abs().max().item() for n in reference)
    moved = max((gathered[n] - initial[n]).abs().max().item() for n in reference)
    print(f"rank {info.rank} zero-{stage}: max |ema - reference| = {worst:.2e}, max EMA movement = {moved:.2e}")
    shutdown()
    if not (worst < 1e-6 and moved > 1e-4):
        sys.exit(1)


if __name__ == "__main__":
    main(int(sys.argv[1]))
