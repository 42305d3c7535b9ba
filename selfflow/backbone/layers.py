"""Math helpers shared by both trunks: timestep embedding, adaLN modulation, attention, RoPE.

Free functions only (no parameters live here), so each trunk's blocks read like the paper.
RoPE follows FLUX's formulation (pairs of adjacent channels rotated, one frequency band per
position axis, axes concatenated); the timestep embedding is the DiT/FLUX sinusoid.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1.0) -> Tensor:
    """Sinusoidal embedding `[cos(scale*t*f), sin(scale*t*f)]` of any-shaped `t` -> `(*t.shape, dim)`.

    DiT/SiT use `scale = 1` on t in [0, 1]; FLUX multiplies t by 1000 (`scale = 1000`).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (scale * t.float())[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


def modulate(x: Tensor, shift: Tensor, one_plus_scale: Tensor, eps: float = 1e-6) -> Tensor:
    """adaLN: `(1 + scale) * LayerNorm(x) + shift` (LayerNorm without affine).

    `shift` and `one_plus_scale` are `(B, 1, D)` for one timestep per sample or `(B, L, D)` per
    token; the `1 +` is added per row by `TokenRows.modulation`, before the gather to tokens.
    """
    return one_plus_scale * F.layer_norm(x, x.shape[-1:], eps=eps) + shift


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """Multi-head attention through SDPA. q, k, v: `(B, H, L, Dh)`; returns `(B, L, H * Dh)`.

    `mask` `(B, L)` bool marks the keys that may be attended to (False: padding); None attends to all.
    """
    if pe is not None:
        q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    return rearrange(out, "b h l d -> b l (h d)")


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation matrices for one position axis: pos `(B, L)` -> `(B, L, dim/2, 2, 2)` in float64."""
    if dim % 2:
        raise ValueError(f"RoPE axis dim must be even, got {dim}")
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = pos.double()[..., None] * omega  # (B, L, dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))


def rope_nd(ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> Tensor:
    """N-axis RoPE table from position ids `(B, L, >= len(axes_dim))` -> `(B, 1, L, sum/2, 2, 2)`.

    Uses the first `len(axes_dim)` id columns (FLUX.2 semantics), one band per axis.
    """
    if ids.shape[-1] < len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} columns but RoPE needs {len(axes_dim)} axes")
    pe = torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3)
    return pe.unsqueeze(1).float()


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of `x` `(B, H, L, Dh)` by `pe` `(B, 1, L, Dh/2, 2, 2)`."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm computed in float32 (FLUX QK-norm), cast back to x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * scale


class TwoTimesteps(NamedTuple):
    """Per-token timesteps given as each sample's two values: token (b, l) is at `s[b]` where
    `mask[b, l]`, else at `t[b]` (dual-timestep scheduling). The trunks build their conditioning rows
    from it directly (`TokenRows.from_two`): no `torch.unique`, so no host synchronisation on a GPU."""

    t: Tensor  # (B,)
    s: Tensor  # (B,)
    mask: Tensor  # (B, L) bool, True = token at s

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape

    @property
    def device(self) -> torch.device:
        return self.t.device

    def dense(self) -> Tensor:
        """The `(B, L)` per-token timesteps."""
        return torch.where(self.mask, self.s[:, None], self.t[:, None])


class TokenRows(NamedTuple):
    """Distinct (sample, timestep) pairs of a batch, so conditioning MLPs run once per pair.

    With dual-timestep scheduling a sample has at most two distinct timesteps, so computing
    the timestep embedding and every adaLN modulation per row and gathering the results to
    tokens is exact and costs almost nothing compared with computing them per token.
    """

    t: Tensor  # (R,) timestep of each row
    sample: Tensor  # (R,) batch index of each row
    inverse: Tensor | None  # (B, L) row of each token; None when t was (B,): row b is sample b
    groups: int = 1  # rows k b + g (g < groups) of `from_two`: row-wise layers run once per g on B rows

    @classmethod
    def from_timesteps(cls, t: Tensor) -> "TokenRows":
        if t.ndim == 1:
            return cls(t, torch.arange(t.shape[0], device=t.device), None)
        values, inv = torch.unique(t, return_inverse=True)
        batch = torch.arange(t.shape[0], device=t.device)[:, None]
        rows, inverse = torch.unique(batch * values.numel() + inv, return_inverse=True)
        return cls(values[rows % values.numel()], rows // values.numel(), inverse)

    @classmethod
    def from_two(cls, two: TwoTimesteps, extra: Tensor | None = None) -> "TokenRows":
        """Rows `(t_b, s_b[, extra_b])` of every sample, in that order, and each token's row `k b + mask`:
        a fixed number of rows, built without looking at the values (rows may repeat a value: exact,
        as every row is computed independently). `extra` (B,): one more row per sample (MMDiT's text)."""
        cols = [two.t, two.s] if extra is None else [two.t, two.s, extra]
        batch = torch.arange(two.t.shape[0], device=two.t.device)
        inverse = batch[:, None] * len(cols) + two.mask.long()
        return cls(torch.stack(cols, dim=1).flatten(), batch.repeat_interleave(len(cols)), inverse, len(cols))

    def apply(self, fn, rows: Tensor, pad: bool = False) -> Tensor:
        """Row-wise `fn` (linear layers, MLPs) on `rows` `(R, X)`. With `groups`, one call per group of B
        rows: CPU BLAS rounds a row differently depending on how many rows a matrix has, and B rows is
        what the scalar-t path computes, so equal timesteps give the scalar output bit for bit. `pad`:
        matrices of fewer than 4 rows are padded (see `modulation`)."""
        if self.groups == 1:
            return _rows(fn, rows, pad)
        parts = [_rows(fn, rows[g :: self.groups], pad) for g in range(self.groups)]
        return torch.stack(parts, dim=1).flatten(0, 1)

    def modulation(self, layer: nn.Module, c_rows: Tensor, chunks: int, group: int = 3) -> tuple[Tensor, ...]:
        """`layer(c_rows)` split into `chunks` equal parts and gathered to tokens: `(B, 1 or L, D)` each.

        The output is made of groups of `group` chunks whose second is an adaLN scale
        ((shift, scale, gate) or (shift, scale)); its `1 +` is added here, per row, so no
        per-token elementwise pass is spent on it. That is exact: gathering copies values.

        CPU BLAS rounds matrices of fewer than 4 rows differently (a GEMV-like kernel), so
        tiny batches are padded to 4 rows: the result then matches computing the modulation
        for every token, as the public release does, bit for bit.
        """
        out = self.apply(layer, c_rows, pad=True).unflatten(-1, (chunks // group, group, -1))  # (R, groups, group, D)
        out = torch.cat((out[:, :, :1], 1 + out[:, :, 1:2], out[:, :, 2:]), dim=2).flatten(1)
        return self.to_tokens(out).chunk(chunks, dim=-1)

    def to_tokens(self, rows: Tensor) -> Tensor:
        """Per-row values `(R, X)` -> `(B, 1, X)` (one row per sample) or `(B, L, X)` per token.

        `index_select` over flattened token indices: a row copy per token, several times faster
        on CPU than advanced indexing with a `(B, L)` index.
        """
        if self.inverse is None:
            return rows[:, None]
        return rows.index_select(0, self.inverse.flatten()).unflatten(0, self.inverse.shape)


def _rows(fn, rows: Tensor, pad: bool) -> Tensor:
    n = rows.shape[0]
    if pad and n < 4:
        return fn(torch.cat([rows, rows[:1].expand(4 - n, -1)]))[:n]
    return fn(rows)


def run_block(block: nn.Module, *args, checkpoint: bool = False):
    """`block(*args)`; with `checkpoint` (and gradients on) its activations are recomputed in backward."""
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)
