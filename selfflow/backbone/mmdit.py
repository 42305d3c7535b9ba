"""FLUX.2-style MMDiT trunk: double-stream blocks over (text, data), then single-stream blocks.

Parameter names follow FLUX.2 (`img_in`, `txt_in`, `time_in`, `double_stream_modulation_img`,
`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `final_layer.linear`, ...), so a FLUX.2
state dict of matching size loads with `strict=True` when the image is the only modality and the
optional class table, guidance embedder and projector are off (the projector is extra: with it on, a
FLUX.2 state dict loads with exactly the projector's keys missing). The projector is the head the
objective needs (`selfflow.backbone.projector`: the Self-Flow release's head, or REPA's). Only each modality's
input and output projections are modality-specific (DESIGN.md section 4). Time follows
DESIGN.md section 1: `t = 1` is pure noise and the output is the velocity `noise - x0`, which
is FLUX's own convention, so no flip is needed.

This file assembles the model from the blocks in `selfflow.backbone.mmdit_blocks`.

Per-token timesteps: `t` is `(B,)` or `(B, L)`. The conditioning MLPs and the three shared
modulation linears run once per distinct (sample, timestep) row of the joint `[txt, data]`
sequence and are gathered to tokens (`TokenRows`); text tokens take a per-sample timestep from
`cfg.text_timestep`. A per-token `t` whose tokens all equal `t[b]` gives bitwise the `(B,)` output.

    model = build_mmdit(MMDiTConfig.mmdit_625m(), device="cuda")
    v = model(x, t, ids, txt=txt)                      # x (B, L, 128), ids (B, L, 4) -> (B, L, 128)
    v, z = model.forward_with_features(x, t, ids, txt=txt, layer=7)   # projector(hidden after block 7)
    h = model.hidden_states(x, t, ids, txt=txt, layer=15)  # raw data-token hidden, stops at block 15
    v = model(a, t, a_ids, txt=txt, modality="audio")  # needs "audio" in cfg.modalities
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from selfflow.backbone.layers import TokenRows, TwoTimesteps, rope_nd, run_block, timestep_embedding
from selfflow.backbone.mmdit_blocks import (
    PREFIX,
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    Modulation,
    Positions,
    RMSNorm,
    SingleStreamBlock,
    TokenEmbedder,
    input_name,
    output_name,
    split_modulation,
)
from selfflow.backbone.projector import REPA_HIDDEN, build_projector, check_projector

TEXT_TIMESTEP_POLICIES = ("mean", "min", "max")
PREDICTIONS = ("velocity", "x")
TIME_FREQ_DIM = 256  # FLUX's sinusoid width for the time and guidance embedders


@dataclass
class MMDiTConfig:
    """FLUX.2 hyperparameters plus the Self-Flow additions (classes, projector, modalities)."""

    kind: str = "mmdit"  # the trunk (`model.kind` of `selfflow train`: mmdit | sit)
    hidden_size: int = 1152
    num_heads: int = 16
    depth_double: int = 7
    depth_single: int = 14
    mlp_ratio: float = 4.0
    axes_dim: list[int] = field(default_factory=lambda: [24, 24, 24])  # RoPE bands over id columns (t, h, w)
    theta: float = 2000.0
    context_dim: int = 4096  # text feature width; 0: no text stream
    num_classes: int = 0  # rows of the label table, last row = null class; 0: no class conditioning
    guidance_embed: bool = False  # FLUX guidance-distilled embedder
    projector_dim: int = 0  # projector output width (Self-Flow: hidden_size; REPA: the encoder's); 0: none
    # Head kind: "selfflow" (the release's head, with biases) or "repa" (REPA's 3-layer MLP, hidden 2048);
    # null: Self-Flow's here, and the objective's head in `selfflow train`.
    projector_kind: str | None = None
    projector_hidden: int = REPA_HIDDEN  # REPA head's inner width (REPA models/sit.py: 2048); "repa" only
    text_timestep: str = "mean"  # per-sample timestep of text tokens from data tokens: mean | min | max
    text_vocab: int = 0  # > 0: a learned token embedder (`txt_embedder`) turns text token ids into txt features
    text_max_length: int = 0  # learned text positions of the token embedder
    grad_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    # What the head predicts. "velocity" (FLUX, the paper, the public release): the head's output is the
    # velocity. "x": the head predicts the clean tokens x0 and the model returns the velocity they imply,
    # `(x_t - x0_hat) / max(t, x_min_t)` (JiT, Li & He 2025, "Back to Basics: Let Denoising Generative
    # Models Denoise": x-prediction with the velocity loss, for raw-pixel tokens), so the loss, the
    # samplers and every caller still see a velocity. Needs in_dim == out_dim for every modality.
    prediction: str = "velocity"
    x_min_t: float = 0.05  # x prediction: the smallest t divided by (JiT's t_eps default, 5e-2)
    modalities: dict[str, list[int]] = field(default_factory=lambda: {"image": [128, 128]})  # name -> [in, out]

    def __post_init__(self):
        if self.kind != "mmdit":
            raise ValueError(f"kind must be 'mmdit' for an MMDiT config, got {self.kind!r}")
        check_projector(self.projector_kind, self.projector_hidden)
        for name in ("hidden_size", "num_heads", "mlp_ratio", "theta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.text_vocab and not (self.context_dim and self.text_max_length > 0):
            raise ValueError("text_vocab needs context_dim > 0 and text_max_length > 0")
        for name in ("depth_double", "depth_single", "context_dim", "num_classes", "projector_dim", "text_vocab"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.depth_double + self.depth_single < 1:
            raise ValueError("depth_double + depth_single must be >= 1 (at least one block)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")
        if not 1 <= len(self.axes_dim) <= 4 or any(d <= 0 or d % 2 for d in self.axes_dim):
            raise ValueError(f"axes_dim must be 1 to 4 positive even sizes (ids have 4 columns), got {self.axes_dim}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"sum(axes_dim)={sum(self.axes_dim)} must equal head_dim={self.head_dim}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not 0 < self.x_min_t <= 1:
            raise ValueError(f"x_min_t must be in (0, 1], got {self.x_min_t}")
        if self.text_timestep not in TEXT_TIMESTEP_POLICIES:
            raise ValueError(f"text_timestep must be one of {TEXT_TIMESTEP_POLICIES}, got {self.text_timestep!r}")
        if not self.modalities:
            raise ValueError("modalities must name at least one modality")
        for name, dims in self.modalities.items():
            if name not in PREFIX:
                raise ValueError(f"modalities: unknown modality {name!r}, known: {sorted(PREFIX)}")
            if len(dims) != 2 or any(d <= 0 for d in dims):
                raise ValueError(f"modalities[{name!r}] must be [in_dim, out_dim] > 0, got {dims}")
            if self.prediction == "x" and dims[0] != dims[1]:
                raise ValueError(f"prediction 'x' needs in_dim == out_dim, modalities[{name!r}] is {dims}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def depth(self) -> int:
        return self.depth_double + self.depth_single

    @property
    def projector_out(self) -> int:
        return self.projector_dim

    @classmethod
    def mmdit_625m(cls) -> "MMDiTConfig":
        """The paper's ~625M MMDiT on FLUX.2 AE latents (128 ch after 2x2 patchify), T5-XXL text."""
        return cls(projector_dim=1152)

    @classmethod
    def tiny(cls) -> "MMDiTConfig":
        """A ~0.5M-parameter model for CPU tests."""
        return cls(
            hidden_size=64,
            num_heads=4,
            depth_double=2,
            depth_single=2,
            axes_dim=[4, 6, 6],
            context_dim=32,
            modalities={"image": [16, 16]},
        )


class MMDiTFeatures(NamedTuple):
    velocity: Tensor  # (B, L, out_dim)
    features: Tensor  # (B, L, projector_dim)


def text_timesteps(t: Tensor, policy: str) -> Tensor:
    """Per-sample text timestep `(B,)` from data-token timesteps `(B, L)` (the paper does not say).

    Where all of a sample's tokens share one value, that value is returned exactly (a float mean
    can round), so homogeneous per-token `t` gives bitwise the scalar-`t` output.
    """
    lo, hi = t.amin(dim=1), t.amax(dim=1)
    value = {"mean": t.mean(dim=1), "min": lo, "max": hi}[policy]
    return torch.where(lo == hi, t[:, 0], value)


class Conditioning(NamedTuple):
    vec: Tensor  # (R, D): time (+ guidance, + class) embedding of each distinct (sample, t) row
    txt_rows: TokenRows  # rows gathered to text tokens
    img_rows: TokenRows  # rows gathered to data tokens
    rows: TokenRows  # rows gathered to the joint [txt, data] sequence


class MMDiT(nn.Module):
    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        for name, (in_dim, _) in cfg.modalities.items():
            self.add_module(input_name(name), nn.Linear(in_dim, dim, bias=False))
        self.txt_in = nn.Linear(cfg.context_dim, dim, bias=False) if cfg.context_dim else None
        self.txt_embedder = (
            TokenEmbedder(cfg.text_vocab, cfg.context_dim, cfg.text_max_length) if cfg.text_vocab else None
        )
        self.time_in = MLPEmbedder(TIME_FREQ_DIM, dim)
        self.guidance_in = MLPEmbedder(TIME_FREQ_DIM, dim) if cfg.guidance_embed else None
        self.y_in = nn.Embedding(cfg.num_classes, dim) if cfg.num_classes else None
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth_double)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth_single)
        )
        self.double_stream_modulation_img = Modulation(dim, double=True)
        self.double_stream_modulation_txt = Modulation(dim, double=True)
        self.single_stream_modulation = Modulation(dim, double=False)
        self.final_layer = LastLayer(dim, cfg.modalities)
        self.projector = None
        if cfg.projector_dim:
            kind = cfg.projector_kind or "selfflow"
            self.projector = build_projector(kind, dim, cfg.projector_dim, cfg.projector_hidden)

    def compile_blocks(self) -> None:
        """`torch.compile` each block (one graph per block kind and token count; the rest stays eager)."""
        for block in [*self.double_blocks, *self.single_blocks]:
            block.compile()

    def init_weights(self) -> None:
        """Xavier linears (zero biases: the projector's), N(0, 0.02) embedders, zero modulations (blocks
        start as identity) and head."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.scale)
        for embedder in (self.time_in, self.guidance_in):
            if embedder is not None:
                nn.init.normal_(embedder.in_layer.weight, std=0.02)
                nn.init.normal_(embedder.out_layer.weight, std=0.02)
        if self.y_in is not None:
            nn.init.normal_(self.y_in.weight, std=0.02)
        if self.txt_embedder is not None:
            nn.init.normal_(self.txt_embedder.tokens.weight, std=0.02)
            nn.init.normal_(self.txt_embedder.positions, std=0.02)
        for module in self.modules():  # the three shared modulation linears
            if isinstance(module, Modulation):
                nn.init.zeros_(module.lin.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        for name in self.cfg.modalities:
            nn.init.zeros_(getattr(self.final_layer, output_name(name)).weight)

    # ----------------------------------------------------------------------------------------
    def _check(self, x, t: Tensor, ids, txt, txt_ids, txt_mask, y, modality, guidance) -> None:
        cfg = self.cfg
        names, parts = ((modality,), (x,)) if isinstance(modality, str) else (tuple(modality), tuple(x))
        if len(names) != len(parts) or not names:
            raise ValueError(f"a joint sequence needs one token tensor per modality, got {len(parts)} for {names}")
        for name, part in zip(names, parts, strict=True):
            if name not in cfg.modalities:
                raise ValueError(f"modality {name!r} is not configured; cfg.modalities has {sorted(cfg.modalities)}")
            in_dim = cfg.modalities[name][0]
            if part.ndim != 3 or part.shape[-1] != in_dim or part.shape[0] != parts[0].shape[0]:
                raise ValueError(f"x must be (B, L, {in_dim}) tokens for {name!r}, got {tuple(part.shape)}")
        B, L = parts[0].shape[0], sum(part.shape[1] for part in parts)
        if t.shape not in ((B,), (B, L)):
            raise ValueError(f"t must be ({B},) or ({B}, {L}), got {tuple(t.shape)}")
        if ids is None or ids.shape != (B, L, 4):
            raise ValueError(f"ids must be ({B}, {L}, 4) position ids, got {None if ids is None else tuple(ids.shape)}")
        if txt is not None:
            if self.txt_in is None:
                raise ValueError("txt was given but cfg.context_dim is 0 (no text stream)")
            if not txt.is_floating_point():  # token ids for the learned embedder
                if self.txt_embedder is None or txt.ndim != 2 or txt.shape[0] != B:
                    raise ValueError(
                        f"txt token ids need cfg.text_vocab > 0 and shape ({B}, L_txt), got {tuple(txt.shape)}"
                    )
            elif txt.ndim != 3 or txt.shape[0] != B or txt.shape[-1] != cfg.context_dim:
                raise ValueError(f"txt must be ({B}, L_txt, {cfg.context_dim}), got {tuple(txt.shape)}")
        if txt_mask is not None and (txt is None or txt_mask.shape != txt.shape[:2] or txt_mask.dtype != torch.bool):
            raise ValueError(f"txt_mask must be a bool (B, L_txt) tensor matching txt, got {tuple(txt_mask.shape)}")
        if txt_ids is not None and (txt is None or txt_ids.shape != (*txt.shape[:2], 4)):
            want = "no txt_ids without txt" if txt is None else f"({B}, {txt.shape[1]}, 4)"
            raise ValueError(f"txt_ids must be {want}, got {tuple(txt_ids.shape)}")
        if y is not None and (self.y_in is None or y.shape != (B,)):
            want = "None (cfg.num_classes is 0)" if self.y_in is None else f"({B},) class ids"
            raise ValueError(f"y must be {want}, got {tuple(y.shape)}")
        if self.guidance_in is not None and (guidance is None or guidance.shape != (B,)):
            raise ValueError(f"guidance must be ({B},), got {None if guidance is None else tuple(guidance.shape)}")

    def _conditioning(self, t: Tensor, n_txt: int, y: Tensor | None, guidance: Tensor | None) -> Conditioning:
        """Embed each distinct (sample, t) row of the joint `[txt, data]` sequence once."""
        if isinstance(t, TwoTimesteps):  # each sample's two timesteps and the text's: 3 rows a sample
            rows = TokenRows.from_two(t, extra=text_timesteps(t.dense(), self.cfg.text_timestep))
            text_row = (3 * torch.arange(t.t.shape[0], device=t.device) + 2)[:, None].expand(-1, n_txt)
            txt_rows = rows._replace(inverse=text_row)
            img_rows = rows
            rows = rows._replace(inverse=torch.cat((text_row, rows.inverse), dim=1))
        elif t.ndim == 1:  # one timestep per sample: text uses it too, rows broadcast over tokens
            rows = TokenRows.from_timesteps(t)
            txt_rows = img_rows = rows
        else:
            t_txt = text_timesteps(t, self.cfg.text_timestep)[:, None].expand(-1, n_txt)
            rows = TokenRows.from_timesteps(torch.cat((t_txt, t), dim=1))
            txt_rows = rows._replace(inverse=rows.inverse[:, :n_txt])
            img_rows = rows._replace(inverse=rows.inverse[:, n_txt:])
        dtype = self.time_in.in_layer.weight.dtype
        vec = rows.apply(
            self.time_in, timestep_embedding(rows.t, TIME_FREQ_DIM, scale=1000.0).to(dtype)
        )  # FLUX: t*1000
        if self.guidance_in is not None:
            g = timestep_embedding(guidance, TIME_FREQ_DIM, scale=1000.0).to(dtype)
            vec = vec + self.guidance_in(g)[rows.sample]
        if self.y_in is not None:
            if y is None:  # unconditional: the last row is the null class
                y = torch.full(t.shape[:1], self.cfg.num_classes - 1, dtype=torch.long, device=t.device)
            vec = vec + self.y_in(y)[rows.sample]
        return Conditioning(vec, txt_rows, img_rows, rows)

    def _embed(self, x, t, ids, txt, txt_ids, txt_mask, y, modality, guidance):
        """Input projections, joint RoPE table and key mask (text first) and per-row conditioning."""
        self._check(x, t, ids, txt, txt_ids, txt_mask, y, modality, guidance)
        if isinstance(modality, str):
            img = getattr(self, input_name(modality))(x)  # (B, L, D)
        else:  # a joint sequence, e.g. (video, action): each part through its own input projection
            img = torch.cat([getattr(self, input_name(m))(part) for m, part in zip(modality, x, strict=True)], dim=1)
        if txt is None:
            pos = ids
        else:
            if txt_ids is None:  # text ids (0, 0, 0, position)
                txt_ids = torch.zeros(*txt.shape[:2], 4, dtype=ids.dtype, device=ids.device)
                txt_ids[..., 3] = torch.arange(txt.shape[1], device=ids.device)
            pos = torch.cat((txt_ids, ids), dim=1)
            if not txt.is_floating_point():
                txt = self.txt_embedder(txt)  # token ids -> (B, L_txt, context_dim)
            txt = self.txt_in(txt.to(img.dtype))  # (B, L_txt, D)
        mask = None
        if txt_mask is not None:
            mask = torch.cat((txt_mask, txt_mask.new_ones(ids.shape[:2])), dim=1)
        positions = Positions(rope_nd(pos, tuple(self.cfg.axes_dim), self.cfg.theta), mask)
        cond = self._conditioning(t, 0 if txt is None else txt.shape[1], y, guidance)
        return img, txt, positions, cond

    def _blocks(self, img, txt, pos: Positions, cond: Conditioning, last: int, tap: int) -> tuple[Tensor, Tensor]:
        """Run blocks 1..`last` (global, 1-based); return the data-token hidden after `last` and after `tap`."""
        n_double, n_txt = self.cfg.depth_double, 0 if txt is None else txt.shape[1]
        tapped = None
        if n_double:
            img_mod = split_modulation(cond.img_rows.modulation(self.double_stream_modulation_img, cond.vec, 6))
            txt_mod = None
            if txt is not None:
                txt_mod = split_modulation(cond.txt_rows.modulation(self.double_stream_modulation_txt, cond.vec, 6))
            for i, block in enumerate(self.double_blocks[:last], start=1):
                img, txt = run_block(block, img, txt, pos, img_mod, txt_mod, checkpoint=self.cfg.grad_checkpointing)
                tapped = img if i == tap else tapped
        if last <= n_double:
            return img, tapped
        (mod,) = split_modulation(cond.rows.modulation(self.single_stream_modulation, cond.vec, 3))
        x = img if txt is None else torch.cat((txt, img), dim=1)  # (B, L_txt + L_img, D), text first
        for i, block in enumerate(self.single_blocks[: last - n_double], start=n_double + 1):
            x = run_block(block, x, pos, mod, checkpoint=self.cfg.grad_checkpointing)
            tapped = x[:, n_txt:] if i == tap else tapped
        return x[:, n_txt:], tapped

    def _head(self, h: Tensor, cond: Conditioning, modality, x, t) -> "Tensor | tuple[Tensor, ...]":
        shift, scale = cond.img_rows.modulation(self.final_layer.adaLN_modulation, cond.vec, 2, group=2)
        lengths = None if isinstance(modality, str) else [part.shape[1] for part in x]
        out = self.final_layer(h, shift, scale, modality, lengths)
        if self.cfg.prediction == "velocity":
            return out
        # x prediction: the velocity `noise - x0` implied by the predicted x0, since x_t - x0 = t (noise - x0);
        # in float32 (a bf16 1 / t would be off by up to 0.4%), returned in the head's dtype
        xs, outs = ((x,), (out,)) if isinstance(modality, str) else (x, out)
        sizes = [part.shape[1] for part in xs]
        tt = (t.dense() if isinstance(t, TwoTimesteps) else t).float().clamp(min=self.cfg.x_min_t)
        if tt.ndim == 1:
            tt = tt[:, None].expand(-1, sum(sizes))
        v = tuple(
            ((xp.float() - op.float()) / tp[..., None]).to(op.dtype)
            for xp, op, tp in zip(xs, outs, tt.split(sizes, dim=1), strict=True)
        )
        return v[0] if isinstance(modality, str) else v

    def _check_layer(self, layer: int) -> None:
        if not 1 <= layer <= self.cfg.depth:
            raise ValueError(f"layer must be in [1, {self.cfg.depth}] (double blocks first), got {layer}")

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        ids: Tensor | None = None,
        txt: Tensor | None = None,
        txt_ids: Tensor | None = None,
        y: Tensor | None = None,
        *,
        txt_mask: Tensor | None = None,
        modality: str = "image",
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Velocity `noise - x0` `(B, L, out_dim)` for data tokens x `(B, L, in_dim)` at t `(B,)` or `(B, L)`.

        ids `(B, L, 4)` position ids (required); txt `(B, L_txt, context_dim)` features or `(B, L_txt)`
        token ids (with cfg.text_vocab); txt_ids default `(0, 0, 0, i)`; txt_mask `(B, L_txt)` bool,
        False on padding; y `(B,)` class ids (None: null class); guidance `(B,)` if cfg.guidance_embed.

        A joint sequence of several modalities (video frames and an action chunk for video-action
        prediction) is `modality=("video", "action")` with `x` a tuple of their tokens: each part
        goes through its own input and output projection, `ids` and a per-token `t` `(B, L)` cover
        the concatenation, and the velocity comes back as a tuple in the same order.
        """
        img, txt, pos, cond = self._embed(x, t, ids, txt, txt_ids, txt_mask, y, modality, guidance)
        h, _ = self._blocks(img, txt, pos, cond, last=self.cfg.depth, tap=0)
        return self._head(h, cond, modality, x, t)

    def forward_with_features(
        self, x, t, ids=None, txt=None, txt_ids=None, y=None, *, txt_mask=None, modality="image", guidance=None, layer
    ) -> MMDiTFeatures:
        """Velocity plus the projector output of the data-token hidden after block `layer` (1-based, doubles first).

        Arguments as in `forward`.
        """
        self._check_layer(layer)
        if self.projector is None:
            raise ValueError("forward_with_features needs a projector: cfg.projector_dim is 0")
        img, txt, pos, cond = self._embed(x, t, ids, txt, txt_ids, txt_mask, y, modality, guidance)
        h, tapped = self._blocks(img, txt, pos, cond, last=self.cfg.depth, tap=layer)
        return MMDiTFeatures(self._head(h, cond, modality, x, t), self.projector(tapped))

    def hidden_states(
        self, x, t, ids=None, txt=None, txt_ids=None, y=None, *, txt_mask=None, modality="image", guidance=None, layer
    ) -> Tensor:
        """Raw data-token hidden state `(B, L, D)` after block `layer`; later blocks and the head never run."""
        self._check_layer(layer)
        img, txt, pos, cond = self._embed(x, t, ids, txt, txt_ids, txt_mask, y, modality, guidance)
        return self._blocks(img, txt, pos, cond, last=layer, tap=layer)[0]


def build_mmdit(cfg: MMDiTConfig, device: torch.device | str = "cpu") -> MMDiT:
    """Construct on the meta device (no memory, no init cost), materialise once, then initialise."""
    with torch.device("meta"):
        model = MMDiT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
