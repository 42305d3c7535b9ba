"""Latent grids <-> tokens with `(t, h, w, l)` position ids (DESIGN.md sections 1 and 9).

A latent `(B, C, H, W)` is patchified as `b c (h p1) (w p2) -> b (h w) (c p1 p2)`: each token
holds `C * p * p` channels in `(c, p1, p2)` order and carries ids `(0, h, w, 0)`. Tokens go back
to a grid by their ids, so any token order (or a subset scattered into zeros) round-trips.
"""

import torch
from einops import rearrange
from torch import Tensor


def patchify(latent: Tensor, patch: int) -> tuple[Tensor, Tensor]:
    """`(B, C, H, W)` -> tokens `(B, H/p * W/p, C*p*p)` and ids `(B, L, 4)` as `(0, h, w, 0)`."""
    if latent.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) latent, got shape {tuple(latent.shape)}")
    B, _, H, W = latent.shape
    if H % patch or W % patch:
        raise ValueError(f"patch size {patch} does not divide the latent grid {H}x{W}")
    tokens = rearrange(latent, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch, p2=patch)
    return tokens, image_ids(B, H // patch, W // patch, latent.device)


def image_ids(batch: int, h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Ids `(0, h, w, 0)` of an `h x w` token grid in `(h w)` order: `(B, h*w, 4)` int64."""
    hh, ww = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    zeros = torch.zeros_like(hh)
    ids = torch.stack([zeros, hh, ww, zeros], dim=-1).reshape(-1, 4)
    return ids.expand(batch, -1, -1)


def unpatchify(tokens: Tensor, ids: Tensor, patch: int, channels: int, h: int, w: int) -> Tensor:
    """Scatter tokens back to a `(B, C, h*p, w*p)` latent by their `(0, h, w, 0)` ids."""
    B, L, D = tokens.shape
    if channels * patch * patch != D:
        raise ValueError(f"tokens have {D} channels, expected {channels} * {patch}^2 = {channels * patch * patch}")
    if ids.shape[:2] != (B, L):
        raise ValueError(f"ids {tuple(ids.shape)} do not match tokens {tuple(tokens.shape)}")
    hi, wi = ids[..., 1], ids[..., 2]
    if (hi < 0).any() or (hi >= h).any() or (wi < 0).any() or (wi >= w).any():
        raise ValueError(f"ids fall outside the {h}x{w} token grid")
    grid = tokens.new_zeros(B, h * w, D)
    grid.scatter_(1, (hi * w + wi)[..., None].expand(-1, -1, D), tokens)
    grid = rearrange(grid, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=h, w=w, p1=patch, p2=patch)
    return grid
