"""Checkpoint-compatible per-token SiT/DiT: the trunk of the public `selfflow_imagenet256.pt`.

Parameter names and math match the public Self-Flow ImageNet release (SiT-XL/2 with per-token
adaLN, a learned-sigma head whose second half is dropped, and the `projector` head used by the
representation loss: the release's head, or REPA's for the REPA baseline; see
`selfflow.backbone.projector`). Public convention (DESIGN.md section 1): `model(x_t, t, y)` returns the
velocity `noise - x0` with `t = 1` pure noise. The checkpoint was trained in the opposite time
axis; `compatibility_mode` embeds `1 - t` and negates the head output, and only this class knows.

    model = build_sit(SiTConfig.xl_2())                # meta device, materialised once, DiT init
    v = model(tokens, t, y)                            # tokens (B, L, C*p*p) in (c, p1, p2) order
    v, z = model.forward_with_features(tokens, t, y, layer=8)   # projector(hidden after block 8)
    h = model.hidden_states(tokens, t, y, layer=20)    # raw hidden after block 20, stops there
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from selfflow.backbone.layers import TokenRows, TwoTimesteps, attention, modulate, run_block, timestep_embedding
from selfflow.backbone.projector import REPA_HIDDEN, build_projector, check_projector


@dataclass
class SiTConfig:
    """Hyperparameters of the public SiT/DiT constructor, plus the projector head."""

    kind: str = "sit"  # the trunk (`model.kind` of `selfflow train`: mmdit | sit)
    input_size: int = 32  # latent grid side (256 px / 8 for SD-VAE)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1001  # rows of the label table; the last row is the null class
    learn_sigma: bool = True
    compatibility_mode: bool = True  # checkpoint trained with s = 1 - t and a negated head
    projector_dim: int = 0  # projector output width; 0: same as hidden_size (the public checkpoint)
    # Head kind: "selfflow" (the release's head, public checkpoint) or "repa" (REPA's 3-layer MLP);
    # null: Self-Flow's here, and the objective's head in `selfflow train`.
    projector_kind: str | None = None
    projector_hidden: int = REPA_HIDDEN  # REPA head's inner width (REPA models/sit.py: 2048); "repa" only
    grad_checkpointing: bool = False  # recompute each block's activations in backward (less memory)

    def __post_init__(self):
        if self.kind != "sit":
            raise ValueError(f"kind must be 'sit' for a SiT config, got {self.kind!r}")
        check_projector(self.projector_kind, self.projector_hidden)
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")
        if self.input_size % self.patch_size:
            raise ValueError(f"patch_size={self.patch_size} does not divide input_size={self.input_size}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of 4 (2-D sin-cos table)")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (the null class), got {self.num_classes}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.projector_dim < 0:
            raise ValueError(f"projector_dim must be >= 0, got {self.projector_dim}")

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def token_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def projector_out(self) -> int:
        return self.projector_dim or self.hidden_size

    @property
    def null_class(self) -> int:
        return self.num_classes - 1

    @classmethod
    def xl_2(cls) -> "SiTConfig":
        """SiT-XL/2 on 32x32x4 SD-VAE latents, as the public ImageNet 256 checkpoint."""
        return cls()


class SiTFeatures(NamedTuple):
    velocity: Tensor  # (B, L, C*p*p)
    features: Tensor  # (B, L, projector_dim)


def sincos_2d_table(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos table `(grid*grid, dim)` in (h w) order, as MAE/DiT build it.

    First half encodes the column (w), second half the row (h); each half is `[sin, cos]`.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    h, w = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def axis(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([axis(w), axis(h)], dim=1).float()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        return self.proj(attention(q, k, v))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_rows: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_rows, dim)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """Linear on already patchified tokens (equal to DiT's stride-p conv on (c, p1, p2) patches)."""

    def __init__(self, token_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(token_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class SiTBlock(nn.Module):
    """DiT block with adaLN-Zero; modulation comes from per-row conditioning gathered to tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c_rows: Tensor, rows: TokenRows) -> Tensor:
        mod = rows.modulation(self.adaLN_modulation, c_rows, 6)  # 6 x (B, 1 or L, D); scales hold 1 + scale
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa * self.attn(modulate(x, shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(x, shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c_rows: Tensor, rows: TokenRows) -> Tensor:
        shift, scale = rows.modulation(self.adaLN_modulation, c_rows, 2, group=2)
        return self.linear(modulate(x, shift, scale))


class SiT(nn.Module):
    def __init__(self, cfg: SiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = PatchEmbed(cfg.token_dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, dim)
        self.register_buffer("pos_embed", sincos_2d_table(dim, cfg.grid)[None], persistent=True)
        self.blocks = nn.ModuleList(SiTBlock(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(dim, cfg.patch_size**2 * out_channels)
        self.projector = build_projector(cfg.projector_kind or "selfflow", dim, cfg.projector_out, cfg.projector_hidden)

    def compile_blocks(self) -> None:
        """`torch.compile` each block (one graph per token count; the rest stays eager)."""
        for block in self.blocks:
            block.compile()

    def init_weights(self) -> None:
        """DiT initialisation: xavier linears (projector included, as REPA's `_basic_init`), zero biases,
        N(0, 0.02) embeddings, zeroed adaLN and head, the fixed sin-cos position table."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.pos_embed.copy_(sincos_2d_table(self.cfg.hidden_size, self.cfg.grid)[None])

    # ----------------------------------------------------------------------------------------
    def default_ids(self, batch: int, device: torch.device | None = None) -> Tensor:
        """Ids `(0, h, w, 0)` of the full token grid in (h w) order: `(B, L, 4)`."""
        h, w = torch.meshgrid(torch.arange(self.cfg.grid), torch.arange(self.cfg.grid), indexing="ij")
        ids = torch.stack([torch.zeros_like(h), h, w, torch.zeros_like(h)], dim=-1).reshape(-1, 4)
        return ids.to(device).expand(batch, -1, -1)

    def _check(self, x: Tensor, t: Tensor, y: Tensor, ids: Tensor | None) -> None:
        B, L = x.shape[:2]
        if x.ndim != 3 or x.shape[-1] != self.cfg.token_dim:
            raise ValueError(f"x must be (B, L, {self.cfg.token_dim}) tokens, got {tuple(x.shape)}")
        if t.shape not in ((B,), (B, L)):
            raise ValueError(f"t must be ({B},) or ({B}, {L}), got {tuple(t.shape)}")
        if y.shape != (B,):
            raise ValueError(f"y must be ({B},) class ids, got {tuple(y.shape)}")
        if ids is not None and ids.shape[:2] != (B, L):
            raise ValueError(f"ids must be ({B}, {L}, 4), got {tuple(ids.shape)}")
        if ids is None and self.cfg.grid**2 != L:
            raise ValueError(f"x has {L} tokens; without ids the model expects the full {self.cfg.grid**2}")

    def _embed(self, x: Tensor, t: Tensor, y: Tensor, ids: Tensor | None) -> tuple[Tensor, Tensor, TokenRows]:
        self._check(x, t, y, ids)
        if ids is None:
            pos = self.pos_embed
        else:
            pos = self.pos_embed[0][ids[..., 1] * self.cfg.grid + ids[..., 2]]
        h = self.x_embedder(x) + pos
        rows = TokenRows.from_two(t) if isinstance(t, TwoTimesteps) else TokenRows.from_timesteps(t)
        t_model = 1 - rows.t if self.cfg.compatibility_mode else rows.t
        c_rows = rows.apply(self.t_embedder, t_model) + self.y_embedder(y)[rows.sample]
        return h, c_rows, rows

    def _head(self, h: Tensor, c_rows: Tensor, rows: TokenRows) -> Tensor:
        out = self.final_layer(h, c_rows, rows)  # (B, L, p*p*C_out) in (p1, p2, c) order
        p, c = self.cfg.patch_size, self.cfg.in_channels
        out = rearrange(out, "b l (p1 p2 c) -> b l c p1 p2", p1=p, p2=p)[:, :, :c]  # drop sigma half
        out = rearrange(out, "b l c p1 p2 -> b l (c p1 p2)")
        return -out if self.cfg.compatibility_mode else out

    def _check_layer(self, layer: int) -> None:
        if not 1 <= layer <= self.cfg.depth:
            raise ValueError(f"feature layer must be in [1, {self.cfg.depth}], got {layer}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor, ids: Tensor | None = None) -> Tensor:
        """Velocity `noise - x0` for tokens x `(B, L, C*p*p)`, t `(B,)` or `(B, L)`, labels y `(B,)`."""
        h, c_rows, rows = self._embed(x, t, y, ids)
        for block in self.blocks:
            h = run_block(block, h, c_rows, rows, checkpoint=self.cfg.grad_checkpointing)
        return self._head(h, c_rows, rows)

    def forward_with_features(
        self, x: Tensor, t: Tensor, y: Tensor, ids: Tensor | None = None, *, layer: int
    ) -> SiTFeatures:
        """Velocity plus the projector output of the hidden state after block `layer` (1-based)."""
        self._check_layer(layer)
        h, c_rows, rows = self._embed(x, t, y, ids)
        features = None
        for i, block in enumerate(self.blocks, start=1):
            h = run_block(block, h, c_rows, rows, checkpoint=self.cfg.grad_checkpointing)
            if i == layer:
                features = self.projector(h)
        return SiTFeatures(self._head(h, c_rows, rows), features)

    def hidden_states(self, x: Tensor, t: Tensor, y: Tensor, ids: Tensor | None = None, *, layer: int) -> Tensor:
        """Raw hidden state after block `layer` (1-based); later blocks and the head never run."""
        self._check_layer(layer)
        h, c_rows, rows = self._embed(x, t, y, ids)
        for block in self.blocks[:layer]:
            h = run_block(block, h, c_rows, rows, checkpoint=self.cfg.grad_checkpointing)
        return h


def build_sit(cfg: SiTConfig, device: torch.device | str = "cpu") -> SiT:
    """Construct on the meta device (no memory, no init cost), materialise once, then initialise."""
    with torch.device("meta"):
        model = SiT(cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    return model
