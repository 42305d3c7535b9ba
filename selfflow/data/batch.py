"""What every training data source yields, and the seed mixing that makes sources deterministic."""

from typing import NamedTuple

import numpy as np
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
