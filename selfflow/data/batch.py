"""What every training data source yields, and the seed mixing that makes sources deterministic."""

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class LatentBatch(NamedTuple):
    x0: Tensor  # (B, L, C) clean latent tokens, float32
    ids: Tensor  # (B, L, 4) int64 position ids (t, h, w, l)
    text: Tensor | None  # (B, L_txt) token ids or (B, L_txt, D) embeddings; None without captions
    text_mask: Tensor | None  # (B, L_txt) bool, False on padding
    labels: Tensor  # (B,) class ids (-1 where the data has none)
    keys: list[str]  # sample keys, for error messages


def mix_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (torch's CPU generator keeps 32 bits of a seed)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def stack_text(samples: list[dict]) -> tuple[Tensor | None, Tensor | None]:
    """Caption ids `(B, L)` (or embeddings `(B, L, D)`) and mask of samples' `text` entries, cut after
    the last column that any sample uses: trailing padding is masked out of attention anyway, so the
    cut changes no output and saves the trunk every padded token (captions are padded to
    `text.max_length` when prepared)."""
    if samples[0]["text"] is None:
        return None, None
    values = torch.stack([s["text"]["ids"] for s in samples])
    text = values.float() if values.is_floating_point() else values.long()
    mask = torch.stack([s["text"]["mask"] for s in samples]).bool()
    used = mask.any(dim=0).nonzero()
    length = int(used[-1]) + 1 if len(used) else 1
    return text[:, :length], mask[:, :length]
