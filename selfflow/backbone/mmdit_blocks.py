"""Building blocks of the FLUX.2-style MMDiT trunk (`selfflow.backbone.mmdit` assembles them).

Each class keeps FLUX.2's parameter names (`img_attn.qkv`, `img_mlp.0`, `linear1`, `norm.query_norm.scale`,
`adaLN_modulation.1`, ...), so a FLUX.2 state dict loads into the assembled model unchanged. Per-modality
projections are named by `input_name` / `output_name` (`img_in`, `final_layer.linear` for the image;
`vid_in`, `final_layer.vid_linear` for video, ...). The math (attention, RoPE, adaLN `modulate`) lives
in `selfflow.backbone.layers`; nothing here holds state beyond its parameters.

    block = DoubleStreamBlock(dim=64, num_heads=4, mlp_hidden=256)
    img, txt = block(img, txt, Positions(pe, mask), img_mod, txt_mod)   # img (B, L, D), txt (B, L_txt, D)
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from selfflow.backbone.layers import attention, modulate, rms_norm

# Modality name -> parameter-name prefix. `image` keeps FLUX.2's names (`img_in`, `final_layer.linear`).
PREFIX = {"image": "img", "video": "vid", "audio": "aud", "action": "act"}


def input_name(modality: str) -> str:
    return f"{PREFIX[modality]}_in"


def output_name(modality: str) -> str:
    return "linear" if modality == "image" else f"{PREFIX[modality]}_linear"


class ModulationOut(NamedTuple):
    shift: Tensor  # (B, 1 or L, D)
    scale: Tensor  # holds 1 + scale (added per row by TokenRows.modulation)
    gate: Tensor


def split_modulation(chunks: tuple[Tensor, ...]) -> list[ModulationOut]:
    """`3 * parts` chunks -> `parts` triples, each in FLUX order (shift, scale, gate)."""
    return [ModulationOut(*chunks[i : i + 3]) for i in range(0, len(chunks), 3)]


class Positions(NamedTuple):
    pe: Tensor  # (B, 1, L_txt + L, Dh/2, 2, 2) RoPE table of the joint sequence, text first
    mask: Tensor | None  # (B, L_txt + L) bool, False on text padding; None when nothing is padded


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """One linear shared by every block of a kind: `vec -> (shift, scale, gate) x (2 or 1)`."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.lin = nn.Linear(dim, (6 if double else 3) * dim, bias=False)

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(F.silu(vec))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale, eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SwiGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return F.silu(x1) * x2


class SelfAttention(nn.Module):
    """Per-stream projections of a double block; the attention itself is joint over both streams."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=False)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`(B, L, D)` -> normalised q, k and v, each `(B, H, L, Dh)`."""
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


def swiglu_mlp(dim: int, hidden: int) -> nn.Sequential:
    """FLUX.2 MLP: `0` Linear(D, 2H), `1` SwiGLU, `2` Linear(H, D)."""
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))


class DoubleStreamBlock(nn.Module):
    """Separate weights per stream, one joint attention over `[txt, img]` (text first)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.img_attn = SelfAttention(dim, num_heads)
        self.img_mlp = swiglu_mlp(dim, mlp_hidden)
        self.txt_attn = SelfAttention(dim, num_heads)
        self.txt_mlp = swiglu_mlp(dim, mlp_hidden)

    def forward(
        self,
        img: Tensor,
        txt: Tensor | None,
        pos: Positions,
        img_mod: list[ModulationOut],
        txt_mod: list[ModulationOut] | None,
    ) -> tuple[Tensor, Tensor | None]:
        (img_mod1, img_mod2), n_txt = img_mod, 0 if txt is None else txt.shape[1]
        q, k, v = self.img_attn.heads(modulate(img, img_mod1.shift, img_mod1.scale))  # (B, H, L_img, Dh)
        if txt is not None:
            txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(txt, txt_mod[0].shift, txt_mod[0].scale))
            q, k, v = (torch.cat((a, b), dim=2) for a, b in ((txt_q, q), (txt_k, k), (txt_v, v)))
        attn = attention(q, k, v, pos.pe, pos.mask)  # (B, L_txt + L_img, D)
        img = img + img_mod1.gate * self.img_attn.proj(attn[:, n_txt:])
        img = img + img_mod2.gate * self.img_mlp(modulate(img, img_mod2.shift, img_mod2.scale))
        if txt is not None:
            txt_mod1, txt_mod2 = txt_mod
            txt = txt + txt_mod1.gate * self.txt_attn.proj(attn[:, :n_txt])
            txt = txt + txt_mod2.gate * self.txt_mlp(modulate(txt, txt_mod2.shift, txt_mod2.scale))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention and SwiGLU MLP from one fused input projection (FLUX single block)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads, self.dim, self.mlp_hidden = num_heads, dim, mlp_hidden
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * mlp_hidden, bias=False)
        self.linear2 = nn.Linear(dim + mlp_hidden, dim, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.mlp_act = SwiGLU()

    def forward(self, x: Tensor, pos: Positions, mod: ModulationOut) -> Tensor:
        qkv, mlp = self.linear1(modulate(x, mod.shift, mod.scale)).split([3 * self.dim, 2 * self.mlp_hidden], -1)
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pos.pe, pos.mask), self.mlp_act(mlp)), dim=-1))
        return x + mod.gate * out


class LastLayer(nn.Module):
    """adaLN (LayerNorm without affine, shift, scale), then one output projection per modality."""

    def __init__(self, dim: int, modalities: dict[str, list[int]]):
        super().__init__()
        for name, (_, out_dim) in modalities.items():
            self.add_module(output_name(name), nn.Linear(dim, out_dim, bias=False))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor, modality: "str | tuple[str, ...]", lengths=None):
        """One modality: `(B, L, out)`; several (a joint sequence): a tuple, split by `lengths`."""
        x = modulate(x, shift, scale)
        if isinstance(modality, str):
            return getattr(self, output_name(modality))(x)
        parts = x.split(lengths, dim=1)
        return tuple(getattr(self, output_name(m))(part) for m, part in zip(modality, parts, strict=True))


class TokenEmbedder(nn.Module):
    """A small learned text encoder for tiny models: token table plus learned positions."""

    def __init__(self, vocab: int, dim: int, max_length: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.zeros(max_length, dim))

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.positions.shape[0]:
            raise ValueError(f"txt has {ids.shape[1]} tokens, the embedder holds {self.positions.shape[0]} positions")
        return self.tokens(ids) + self.positions[: ids.shape[1]]
