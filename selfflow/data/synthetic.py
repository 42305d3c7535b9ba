"""A small in-memory latent dataset for training before real shards exist (and for tests).

Item `i` of a modality is a fixed latent token grid: its class `i % num_classes` picks one of
`num_classes` random prototypes, plus item noise, so a model can learn class-conditional
structure in a few hundred CPU steps. Everything is a function of `(seed, modality, index)`;
the batch of a step is a function of `(seed, step, rank)`, so resuming needs no data state.

    data = SyntheticLatents("image", SyntheticConfig(grid=[1, 4, 4], channels=16), seed=0)
    batch = data.batch(step=10, rank=0, batch_size=8)   # tokens, ids, labels
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


@dataclass
class SyntheticConfig:
    grid: list[int] = field(default_factory=lambda: [1, 4, 4])  # tokens along (t, h, w)
    channels: int = 16  # channels per token
    num_items: int = 256
    num_classes: int = 4
    item_noise: float = 0.3  # spread of items around their class prototype

    def __post_init__(self):
        if len(self.grid) != 3 or any(g < 1 for g in self.grid):
            raise ValueError(f"grid must be three positive sizes (t, h, w), got {self.grid}")
        if self.channels < 1 or self.num_items < 1 or self.num_classes < 1:
            raise ValueError("channels, num_items and num_classes must be >= 1")


class Batch(NamedTuple):
    x0: Tensor  # (B, L, C) clean latent tokens
    ids: Tensor  # (B, L, 4) position ids (t, h, w, l)
    labels: Tensor  # (B,) class ids
    indices: Tensor  # (B,) item indices (the data position)


def mix_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (torch's CPU generator keeps 32 bits of a seed)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class SyntheticLatents:
    def __init__(self, modality: str, cfg: SyntheticConfig, seed: int):
        self.cfg = cfg
        gen = torch.Generator().manual_seed(mix_seed(seed, sum(modality.encode())))
        t, h, w = cfg.grid
        self.prototypes = torch.randn(cfg.num_classes, t * h * w, cfg.channels, generator=gen)
        self.labels = torch.arange(cfg.num_items) % cfg.num_classes
        noise = torch.randn(cfg.num_items, t * h * w, cfg.channels, generator=gen)
        self.items = self.prototypes[self.labels] + cfg.item_noise * noise
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        self.ids = torch.stack([tt, hh, ww, torch.zeros_like(tt)], dim=-1).reshape(-1, 4)
        self.seed = seed

    def batch(self, step: int, rank: int, batch_size: int) -> Batch:
        """Items of `(step, rank)`: a per-step permutation split across ranks (no repeats within a step)."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, step, 7919))
        order = torch.randperm(self.cfg.num_items, generator=gen)
        picks = torch.arange(rank * batch_size, (rank + 1) * batch_size) % self.cfg.num_items
        idx = order[picks]
        return Batch(self.items[idx], self.ids.expand(len(idx), -1, -1), self.labels[idx], idx)
