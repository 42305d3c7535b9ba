"""A small in-memory latent dataset for training before real shards exist (and for tests).

Item `i` of a modality is a fixed latent token grid: its class `i % num_classes` picks one of
`num_classes` random prototypes, plus item noise, so a model can learn class-conditional
structure in a few hundred CPU steps. Everything is a function of `(seed, modality, index)`;
batch number `n` of a rank is a function of `(seed, n, rank)`, so a stream's position is all
a resumed run needs.

    data = SyntheticLatents("image", SyntheticConfig(grid=[1, 4, 4], channels=16), seed=0)
    batch = next(SyntheticStream(data, batch_size=8, rank=0))   # LatentBatch
"""

from dataclasses import dataclass, field

import torch

from selfflow.data.batch import LatentBatch, mix_seed


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

    def batch(self, index: int, rank: int, batch_size: int) -> LatentBatch:
        """Batch number `index` of `rank`: a per-index permutation split across ranks (no repeats within it)."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, index, 7919))
        order = torch.randperm(self.cfg.num_items, generator=gen)
        picks = torch.arange(rank * batch_size, (rank + 1) * batch_size) % self.cfg.num_items
        idx = order[picks]
        keys = [f"synthetic-{i}" for i in idx.tolist()]
        return LatentBatch(self.items[idx], self.ids.expand(len(idx), -1, -1), None, None, self.labels[idx], keys)


class SyntheticStream:
    """`SyntheticLatents` as an endless stream with a position (the interface of `LatentStream`)."""

    def __init__(self, data: SyntheticLatents, batch_size: int, rank: int, position: int = 0):
        self.data, self.batch_size, self.rank, self.position = data, batch_size, rank, position

    def __iter__(self) -> "SyntheticStream":
        return self

    def __next__(self) -> LatentBatch:
        batch = self.data.batch(self.position, self.rank, self.batch_size)
        self.position += 1
        return batch
