"""Latent grids <-> tokens with `(t, h, w, l)` position ids (DESIGN.md sections 1 and 9).

A latent `(B, C, H, W)` is patchified as `b c (h p1) (w p2) -> b (h w) (c p1 p2)`: each token
holds `C * p * p` channels in `(c, p1, p2)` order and carries ids `(0, h, w, 0)`. Tokens go back
to a grid by their ids, so any token order (or a subset scattered into zeros) round-trips.

`patchify_3d` / `unpatchify_3d` do the same for `(B, C, T, H, W)` grids with ids `(t, h, w, 0)`:
the modality adapters (`selfflow/modalities/base.py`) view images as `T = 1` and audio as
`H = W = 1`, so one pair of functions serves image, video and audio.
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


# 3-D grids: every modality's latent viewed as `(B, C, T, H, W)` (image T = 1, audio H = W = 1).


def grid_ids(batch: int, t: int, h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Ids `(t, h, w, 0)` of a `t x h x w` token grid in `(t h w)` order: `(B, t*h*w, 4)` int64."""
    axes = [torch.arange(n, device=device) for n in (t, h, w)]
    tt, hh, ww = torch.meshgrid(*axes, indexing="ij")
    ids = torch.stack([tt, hh, ww, torch.zeros_like(tt)], dim=-1).reshape(-1, 4)
    return ids.expand(batch, -1, -1)


def patchify_3d(latent: Tensor, patch: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """`(B, C, T, H, W)` -> tokens `(B, T/pt * H/ph * W/pw, C*pt*ph*pw)` in `(c, pt, ph, pw)` order, ids `(t, h, w, 0)`.

    With `T = 1` and patch `(1, p, p)` this is exactly `patchify` (same tokens, same ids).
    """
    if latent.ndim != 5:
        raise ValueError(f"expected a (B, C, T, H, W) latent, got shape {tuple(latent.shape)}")
    B, _, T, H, W = latent.shape
    pt, ph, pw = patch
    if T % pt or H % ph or W % pw:
        raise ValueError(f"patch {tuple(patch)} does not divide the latent grid {T}x{H}x{W}")
    tokens = rearrange(latent, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
    return tokens, grid_ids(B, T // pt, H // ph, W // pw, latent.device)


def unpatchify_3d(tokens: Tensor, ids: Tensor, patch: tuple[int, int, int], channels: int, grid: tuple) -> Tensor:
    """Scatter tokens back to a `(B, C, t*pt, h*ph, w*pw)` latent by their `(t, h, w, 0)` ids; `grid = (t, h, w)`."""
    B, L, D = tokens.shape
    pt, ph, pw = patch
    t, h, w = grid
    if channels * pt * ph * pw != D:
        raise ValueError(f"tokens have {D} channels, expected {channels} * {pt}*{ph}*{pw} = {channels * pt * ph * pw}")
    if ids.ndim != 3 or ids.shape[:2] != (B, L) or ids.shape[2] < 3:
        raise ValueError(f"ids {tuple(ids.shape)} do not match tokens {tuple(tokens.shape)}")
    ti, hi, wi = ids[..., 0], ids[..., 1], ids[..., 2]
    if any(((i < 0) | (i >= n)).any() for i, n in ((ti, t), (hi, h), (wi, w))):
        raise ValueError(f"ids fall outside the {t}x{h}x{w} token grid")
    grid_tokens = tokens.new_zeros(B, t * h * w, D)
    grid_tokens.scatter_(1, ((ti * h + hi) * w + wi)[..., None].expand(-1, -1, D), tokens)
    pattern = "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)"
    return rearrange(grid_tokens, pattern, t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)
