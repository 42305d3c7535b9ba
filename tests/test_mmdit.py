"""Tests of the FLUX.2-style MMDiT trunk (tiny configs, CPU): `pytest -q tests/test_mmdit.py`."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from selfflow.backbone.layers import TokenRows, TwoTimesteps, modulate, rope_nd
from selfflow.backbone.mmdit import (
    MMDiT,
    MMDiTConfig,
    Positions,
    build_mmdit,
    count_parameters,
    text_timesteps,
)
from selfflow.backbone.mmdit_blocks import ModulationOut
from selfflow.backbone.sit import SiT, SiTConfig

B, H, W, L_TXT = 3, 2, 3, 5


def tiny(**overrides) -> MMDiTConfig:
    return dataclasses.replace(MMDiTConfig.tiny(), **overrides)


def image_ids(batch: int = B, h: int = H, w: int = W) -> torch.Tensor:
    """Ids `(0, h, w, 0)` of an h x w grid in (h w) order: `(B, h*w, 4)`."""
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.stack([torch.zeros_like(hh), hh, ww, torch.zeros_like(hh)], dim=-1).reshape(-1, 4)
    return ids.expand(batch, -1, -1).clone()


def text_ids(batch: int = B, n: int = L_TXT) -> torch.Tensor:
    ids = torch.zeros(batch, n, 4, dtype=torch.long)
    ids[..., 3] = torch.arange(n)
    return ids


def randomised(cfg: MMDiTConfig, seed: int = 0) -> MMDiT:
    """A model whose blocks are not the identity: init, then random modulations, head and norm scales."""
    torch.manual_seed(seed)
    model = build_mmdit(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("final_layer") or name.startswith("y_in"):
                p.normal_(0.0, 0.1)
            elif name.endswith(".scale"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def inputs(cfg: MMDiTConfig, seed: int = 1, batch: int = B) -> dict:
    g = torch.Generator().manual_seed(seed)
    in_dim = cfg.modalities["image"][0]
    return dict(
        x=torch.randn(batch, H * W, in_dim, generator=g),
        t=torch.rand(batch, generator=g),
        ids=image_ids(batch),
        txt=torch.randn(batch, L_TXT, cfg.context_dim, generator=g) if cfg.context_dim else None,
    )


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [2, 5])
@pytest.mark.parametrize("with_text", [True, False])
@pytest.mark.parametrize("num_classes", [0, 7])
@pytest.mark.parametrize("policy", ["mean", "min", "max"])
def test_homogeneous_token_t_equals_scalar_t_bitwise(batch, with_text, num_classes, policy):
    cfg = tiny(num_classes=num_classes, text_timestep=policy, context_dim=32 if with_text else 0)
    model = randomised(cfg)
    inp = inputs(cfg, batch=batch)
    x, t, ids = inp["x"], inp["t"], inp["ids"]
    y = torch.arange(batch) % num_classes if num_classes else None
    t_tok = t[:, None].expand(-1, x.shape[1]).contiguous()
    with torch.no_grad():
        v_scalar = model(x, t, ids, inp["txt"], y=y)
        v_token = model(x, t_tok, ids, inp["txt"], y=y)
        v_mixed = model(x, torch.where(torch.arange(x.shape[1]) % 2 == 0, t_tok, 0.5 * t_tok), ids, inp["txt"], y=y)
    assert torch.equal(v_scalar, v_token)
    assert not torch.allclose(v_scalar, v_mixed)  # per-token t does reach the output


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("with_text", [True, False])
@pytest.mark.parametrize("num_classes", [0, 7])
def test_two_timesteps_give_the_per_token_output_without_unique(batch, with_text, num_classes, monkeypatch):
    """Self-Flow's student input as each sample's (t, s) and the token mask: the conditioning rows are
    built without `torch.unique` (a host sync on a GPU); the output is the per-token tensor's up to
    float round-off (the row matrices have other sizes), and t = s gives the scalar-t output bit for bit."""
    cfg = tiny(num_classes=num_classes, context_dim=32 if with_text else 0, projector_dim=32)
    model = randomised(cfg)
    inp = inputs(cfg, batch=batch)
    x, t, ids = inp["x"], inp["t"], inp["ids"]
    s = torch.rand(batch, generator=torch.Generator().manual_seed(5))
    mask = torch.rand(batch, x.shape[1], generator=torch.Generator().manual_seed(6)) < 0.3
    y = torch.arange(batch) % num_classes if num_classes else None
    two = TwoTimesteps(t, s, mask)
    with torch.no_grad():
        dense = model.forward_with_features(x, two.dense(), ids, inp["txt"], y=y, layer=2)
        hidden = model.hidden_states(x, two.dense(), ids, inp["txt"], y=y, layer=3)
        scalar = model(x, t, ids, inp["txt"], y=y)
        monkeypatch.setattr(torch, "unique", None)  # any call would raise
        rows = model.forward_with_features(x, two, ids, inp["txt"], y=y, layer=2)
        rows_hidden = model.hidden_states(x, two, ids, inp["txt"], y=y, layer=3)
        equal = model(x, TwoTimesteps(t, t, mask), ids, inp["txt"], y=y)
    torch.testing.assert_close(rows.velocity, dense.velocity, rtol=0, atol=2e-6)
    torch.testing.assert_close(rows.features, dense.features, rtol=0, atol=2e-6)
    torch.testing.assert_close(rows_hidden, hidden, rtol=0, atol=2e-6)
    assert torch.equal(equal, scalar)
    assert (rows.velocity - scalar).abs().max() > 1e-3  # s and the mask do reach the output


def test_token_rows_from_two():
    t, s = torch.tensor([0.1, 0.7]), torch.tensor([0.3, 0.2])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    rows = TokenRows.from_two(TwoTimesteps(t, s, mask), extra=torch.tensor([0.5, 0.9]))
    assert rows.groups == 3 and rows.sample.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(rows.t, torch.tensor([0.1, 0.3, 0.5, 0.7, 0.2, 0.9]))
    assert torch.equal(rows.t[rows.inverse], torch.where(mask, s[:, None], t[:, None]))  # each token's own t


def test_text_timestep_policies():
    t = torch.tensor([[0.2, 0.2, 0.8], [0.3, 0.3, 0.3]])
    assert torch.allclose(text_timesteps(t, "mean"), torch.tensor([0.4, 0.3]))
    assert torch.equal(text_timesteps(t, "min"), torch.tensor([0.2, 0.3]))
    assert torch.equal(text_timesteps(t, "max"), torch.tensor([0.8, 0.3]))
    same = torch.full((1, 7), 0.1)  # float mean of seven 0.1s is not exactly 0.1; the policy returns 0.1
    assert torch.equal(text_timesteps(same, "mean"), torch.tensor([0.1]))


def test_init_blocks_are_identity_and_head_is_zero():
    cfg = tiny(projector_dim=8)
    model = build_mmdit(cfg)
    inp = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(model(**inp), torch.zeros(B, H * W, 16))
        h = model.hidden_states(**inp, layer=cfg.depth)
        assert torch.allclose(h, model.img_in(inp["x"]))


# ----------------------------------------------------------------------------------------------
def test_rope_shift_invariance():
    cfg = tiny()
    model = randomised(cfg)
    inp = inputs(cfg)
    shift = torch.tensor([3, 5, 7, 0])  # (t, h, w, l) columns; RoPE reads the first three
    with torch.no_grad():
        v = model(**inp, txt_ids=text_ids())
        v_shifted = model(**{**inp, "ids": inp["ids"] + shift}, txt_ids=text_ids() + shift)
        v_image_only = model(**{**inp, "ids": inp["ids"] + shift}, txt_ids=text_ids())
    assert torch.allclose(v, v_shifted, atol=1e-5)
    assert (v - v_image_only).abs().max() > 1e-3  # the test can fail: a relative change is visible


# ----------------------------------------------------------------------------------------------
def rotate(x: torch.Tensor, pos: torch.Tensor, axes_dim: list[int], theta: float) -> torch.Tensor:
    """Reference RoPE by complex multiplication: x `(B, H, L, Dh)`, pos `(B, L, 4)`."""
    angles = []
    for i, d in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(pos[..., i, None].double() * omega)
    rot = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, dim=-1))[:, None]  # (B, 1, L, Dh/2)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot).reshape(x.shape).float()


def reference_double_block(block, img, txt, pos, img_mod, txt_mod, cfg):
    """Independent double block: text tokens first in the joint sequence, explicit softmax attention."""
    heads, dh = cfg.num_heads, cfg.head_dim

    def ln_mod(x, shift, scale):
        return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def qkv(attn, x, shift, scale):
        q, k, v = attn.qkv(ln_mod(x, shift, scale)).reshape(*x.shape[:2], 3, heads, dh).permute(2, 0, 3, 1, 4)
        return rms(q, attn.norm.query_norm.scale), rms(k, attn.norm.key_norm.scale), v

    tq, tk, tv = qkv(block.txt_attn, txt, *txt_mod[:2])
    iq, ik, iv = qkv(block.img_attn, img, *img_mod[:2])
    q, k, v = (torch.cat(pair, dim=2) for pair in ((tq, iq), (tk, ik), (tv, iv)))
    q, k = rotate(q, pos, cfg.axes_dim, cfg.theta), rotate(k, pos, cfg.axes_dim, cfg.theta)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(*q.shape[:1], q.shape[2], heads * dh)
    n = txt.shape[1]

    def finish(x, attn_out, proj, mlp, mod):
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        x = x + gate1 * proj(attn_out)
        a, b = mlp[0](ln_mod(x, shift2, scale2)).chunk(2, dim=-1)
        return x + gate2 * mlp[2](F.silu(a) * b)

    return (
        finish(img, out[:, n:], block.img_attn.proj, block.img_mlp, img_mod),
        finish(txt, out[:, :n], block.txt_attn.proj, block.txt_mlp, txt_mod),
    )


def test_double_block_matches_text_first_reference():
    # 4 RoPE axes so text positions (column l) enter the rotation: a token/position misalignment shows.
    cfg = tiny(axes_dim=[4, 4, 4, 4])
    model = randomised(cfg)
    block = model.double_blocks[0]
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(B, H * W, 64, generator=g), torch.randn(B, L_TXT, 64, generator=g)
    img_mod = list(torch.randn(6, B, 1, 64, generator=g) * 0.3)
    txt_mod = list(torch.randn(6, B, 1, 64, generator=g) * 0.3)
    pos = torch.cat((text_ids(), image_ids()), dim=1)
    pe = rope_nd(pos, tuple(cfg.axes_dim), cfg.theta)

    def triples(m):
        return [ModulationOut(m[0], 1 + m[1], m[2]), ModulationOut(m[3], 1 + m[4], m[5])]  # scale held as 1 + scale

    with torch.no_grad():
        img_out, txt_out = block(img, txt, Positions(pe, None), triples(img_mod), triples(txt_mod))
        ref_img, ref_txt = reference_double_block(block, img, txt, pos, img_mod, txt_mod, cfg)
    assert torch.allclose(img_out, ref_img, atol=1e-5)
    assert torch.allclose(txt_out, ref_txt, atol=1e-5)


def test_single_stream_sequence_is_text_then_data():
    """Attention is permutation-equivariant, so token order is visible only in the joint layout:
    the single-stream input must be `cat([txt, img])` with the matching RoPE table, and the
    data-token features are the tail of the joint sequence."""
    cfg = tiny(axes_dim=[4, 4, 4, 4])
    model = randomised(cfg)
    inp = inputs(cfg)
    seen = {}
    model.double_blocks[-1].register_forward_hook(lambda m, args, out: seen.update(double_out=out))
    model.single_blocks[0].register_forward_pre_hook(lambda m, args: seen.update(single_in=args))
    model.single_blocks[0].register_forward_hook(lambda m, args, out: seen.update(single_out=out))
    with torch.no_grad():
        model(**inp)
        img, txt = seen["double_out"]
        joint, (pe, mask), _ = seen["single_in"]
        assert mask is None
        assert torch.equal(joint[:, :L_TXT], txt) and torch.equal(joint[:, L_TXT:], img)
        assert torch.equal(pe, rope_nd(torch.cat((text_ids(), inp["ids"]), dim=1), (4, 4, 4, 4), cfg.theta))
        h = model.hidden_states(**inp, layer=cfg.depth_double + 1)
        assert torch.equal(h, seen["single_out"][:, L_TXT:])

    no_double = randomised(tiny(depth_double=0))  # joint input is then exactly the two input projections
    no_double.single_blocks[0].register_forward_pre_hook(lambda m, args: seen.update(single_in=args))
    with torch.no_grad():
        no_double(**inp)
        joint = seen["single_in"][0]
        assert torch.equal(joint[:, :L_TXT], no_double.txt_in(inp["txt"]))
        assert torch.equal(joint[:, L_TXT:], no_double.img_in(inp["x"]))


# ----------------------------------------------------------------------------------------------
def flux2_state_dict(n_double: int, n_single: int, dim: int, mlp: int, head: int, in_ch: int, ctx: int) -> dict:
    """FLUX.2 parameter names and shapes, written out independently of the model code."""
    shapes = {
        "img_in.weight": (dim, in_ch),
        "txt_in.weight": (dim, ctx),
        "time_in.in_layer.weight": (dim, 256),
        "time_in.out_layer.weight": (dim, dim),
        "double_stream_modulation_img.lin.weight": (6 * dim, dim),
        "double_stream_modulation_txt.lin.weight": (6 * dim, dim),
        "single_stream_modulation.lin.weight": (3 * dim, dim),
        "final_layer.linear.weight": (in_ch, dim),
        "final_layer.adaLN_modulation.1.weight": (2 * dim, dim),
    }
    for i in range(n_double):
        for s in ("img", "txt"):
            shapes |= {
                f"double_blocks.{i}.{s}_attn.qkv.weight": (3 * dim, dim),
                f"double_blocks.{i}.{s}_attn.norm.query_norm.scale": (head,),
                f"double_blocks.{i}.{s}_attn.norm.key_norm.scale": (head,),
                f"double_blocks.{i}.{s}_attn.proj.weight": (dim, dim),
                f"double_blocks.{i}.{s}_mlp.0.weight": (2 * mlp, dim),
                f"double_blocks.{i}.{s}_mlp.2.weight": (dim, mlp),
            }
    for i in range(n_single):
        shapes |= {
            f"single_blocks.{i}.linear1.weight": (3 * dim + 2 * mlp, dim),
            f"single_blocks.{i}.linear2.weight": (dim, dim + mlp),
            f"single_blocks.{i}.norm.query_norm.scale": (head,),
            f"single_blocks.{i}.norm.key_norm.scale": (head,),
        }
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


def test_flux2_state_dict_loads_strictly():
    cfg = tiny(depth_double=2, depth_single=3)
    sd = flux2_state_dict(2, 3, dim=64, mlp=256, head=16, in_ch=16, ctx=32)
    model = MMDiT(cfg)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.double_blocks[0].img_attn.qkv.weight, sd["double_blocks.0.img_attn.qkv.weight"])
    assert torch.equal(model.single_blocks[2].norm.key_norm.scale, sd["single_blocks.2.norm.key_norm.scale"])
    assert torch.equal(model.final_layer.linear.weight, sd["final_layer.linear.weight"])


# ----------------------------------------------------------------------------------------------
def test_bad_shapes_name_the_argument():
    cfg = tiny()
    model = build_mmdit(cfg)
    inp = inputs(cfg)
    bad = {
        "x": {"x": torch.randn(B, H * W, 15)},
        "t": {"t": torch.rand(B, H * W + 1)},
        "ids": {"ids": image_ids()[:, :, :3]},
        "txt": {"txt": torch.randn(B, L_TXT, 31)},
    }
    for name, override in bad.items():
        with pytest.raises(ValueError, match=rf"^{name} must be .*got \("):
            model(**{**inp, **override})
    with pytest.raises(ValueError, match=r"^ids must be \(3, 6, 4\).*got None"):
        model(**{**inp, "ids": None})
    with pytest.raises(ValueError, match=r"^txt_ids must be \(3, 5, 4\)"):
        model(**inp, txt_ids=text_ids(n=4))
    with pytest.raises(ValueError, match=r"^y must be"):
        model(**inp, y=torch.zeros(B, dtype=torch.long))  # num_classes is 0
    with pytest.raises(ValueError, match="'audio'"):
        model(**inp, modality="audio")


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_hidden_states_stops_early_and_matches_full_run(layer):
    cfg = tiny(projector_dim=8)
    model = randomised(cfg)
    inp = inputs(cfg)
    blocks = [*model.double_blocks, *model.single_blocks]
    captured = {}

    def capture(module, args, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out[:, L_TXT:]

    blocks[layer - 1].register_forward_hook(capture)
    with torch.no_grad():
        full = model.forward_with_features(**inp, layer=layer)
        assert torch.equal(full.velocity, model(**inp))

        def refuse(*_):
            raise RuntimeError("ran past the requested layer")

        handles = [b.register_forward_pre_hook(refuse) for b in blocks[layer:]]
        handles.append(model.final_layer.register_forward_pre_hook(refuse))
        handles.append(model.final_layer.adaLN_modulation.register_forward_pre_hook(refuse))
        h = model.hidden_states(**inp, layer=layer)
        for handle in handles:
            handle.remove()
    assert h.shape == (B, H * W, cfg.hidden_size)
    assert torch.equal(h, captured["h"])
    assert torch.equal(full.features, model.projector(h))
    with pytest.raises(ValueError, match="layer"):
        model.hidden_states(**inp, layer=cfg.depth + 1)


# ----------------------------------------------------------------------------------------------
def test_625m_preset_parameter_count():
    with torch.device("meta"):
        model = MMDiT(MMDiTConfig.mmdit_625m())
    n = count_parameters(model)
    print(f"mmdit_625m parameters: {n:,} (projector {count_parameters(model.projector):,})")
    assert abs(n - 625e6) / 625e6 < 0.02


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_heads": 5}, "num_heads"),
        ({"axes_dim": [4, 4, 4]}, "axes_dim"),
        ({"axes_dim": [3, 7, 6]}, "axes_dim"),
        ({"modalities": {"smell": [4, 4]}}, "modalities"),
        ({"modalities": {"image": [16]}}, "modalities"),
        ({"depth_double": 0, "depth_single": 0}, "depth_double"),
        ({"depth_single": -1}, "depth_single"),
        ({"text_timestep": "median"}, "text_timestep"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
        ({"prediction": "eps"}, "prediction"),
        ({"prediction": "x", "modalities": {"image": [16, 12]}}, "in_dim == out_dim"),
        ({"x_min_t": 0.0}, "x_min_t"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)


# ----------------------------------------------------------------------------------------------
def test_per_modality_projections():
    cfg = tiny(modalities={"image": [16, 16], "audio": [8, 12]})
    model = randomised(cfg)
    keys = set(model.state_dict())
    assert {"img_in.weight", "aud_in.weight", "final_layer.linear.weight", "final_layer.aud_linear.weight"} <= keys
    inp = inputs(cfg)
    audio = torch.randn(B, 4, 8)
    audio_ids = torch.zeros(B, 4, 4, dtype=torch.long)
    audio_ids[..., 0] = torch.arange(4)  # (frame, 0, 0, 0)
    with torch.no_grad():
        v_img = model(**inp)
        v_aud = model(audio, inp["t"], audio_ids, inp["txt"], modality="audio")
        assert v_aud.shape == (B, 4, 12)
        model.aud_in.weight.add_(0.1)
        assert torch.equal(model(**inp), v_img)
        assert not torch.allclose(model(audio, inp["t"], audio_ids, inp["txt"], modality="audio"), v_aud)
    with pytest.raises(ValueError, match="^x must be"):
        model(audio, inp["t"], audio_ids, inp["txt"])  # 8-channel tokens into the image projection


def test_text_padding_is_masked_and_token_ids_embed():
    """Padded text positions (masked) do not change the data tokens' output, whatever they hold."""
    torch.manual_seed(0)
    cfg = MMDiTConfig.tiny()
    cfg.text_vocab, cfg.text_max_length = 50, 8
    model = build_mmdit(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 6, 16), torch.rand(2)
    ids = torch.zeros(2, 6, 4, dtype=torch.long)
    ids[..., 1] = torch.arange(6)
    tokens = torch.randint(1, 50, (2, 4))
    short = model(x, t, ids, tokens)
    padded_tokens = torch.cat((tokens, torch.randint(1, 50, (2, 3))), dim=1)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, :4] = True
    padded = model(x, t, ids, padded_tokens, txt_mask=mask)
    torch.testing.assert_close(padded, short, rtol=0, atol=1e-5)
    unmasked = model(x, t, ids, padded_tokens)
    assert (unmasked - short).abs().max() > 1e-3  # without the mask the padding would leak in
    other = model(x, t, ids, torch.randint(1, 50, (2, 4)))
    assert (other - short).abs().max() > 1e-3  # the text does condition the output
    with pytest.raises(ValueError, match="txt_mask"):
        model(x, t, ids, tokens, txt_mask=mask)
    with pytest.raises(ValueError, match="token ids"):
        build_mmdit(MMDiTConfig.tiny())(x, t, ids, tokens)


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    cfg = MMDiTConfig.tiny()
    cfg.projector_dim = 64
    plain = build_mmdit(cfg)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ckpt = build_mmdit(dataclasses.replace(cfg, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 6, 16), torch.rand(2, 6)
    ids = torch.zeros(2, 6, 4, dtype=torch.long)
    ids[..., 1] = torch.arange(6)
    saved = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        count = 0

        def pack(tensor):
            nonlocal count
            count += tensor.numel()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model.forward_with_features(
                x, t, ids, torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1)), layer=3
            )
            (out.velocity.square().mean() + out.features.square().mean()).backward()
        saved[name] = count
    for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert saved["ckpt"] < saved["plain"] / 2  # activations are recomputed, not kept


def test_joint_sequence_of_two_modalities_uses_each_projection():
    """`modality=("video", "action")`: the same trunk over the concatenated tokens, each part through
    its own input and output projection; equal to running the trunk on hand-concatenated embeddings."""
    cfg = tiny(modalities={"video": [6, 6], "action": [7, 7]}, context_dim=0)
    model = randomised(cfg)
    g = torch.Generator().manual_seed(3)
    frames, actions = torch.randn(B, 8, 6, generator=g), torch.randn(B, 3, 7, generator=g)
    ids = torch.zeros(B, 11, 4, dtype=torch.long)
    ids[:, :8, 0], ids[:, :8, 1] = torch.arange(8) // 4, torch.arange(8) % 4  # frames (t, h, 0, 0)
    ids[:, 8:, 0] = torch.arange(3) + 1  # actions (step, 0, 0, 0)
    t = torch.cat((torch.zeros(B, 8), torch.rand(B, 3, generator=g)), dim=1)  # observed frames at t = 0
    with torch.no_grad():
        v_frames, v_actions = model((frames, actions), t, ids, modality=("video", "action"))
        # reference: embed by hand, run the blocks, split, project by hand
        img = torch.cat((model.vid_in(frames), model.act_in(actions)), dim=1)
        pos = Positions(rope_nd(ids, tuple(cfg.axes_dim), cfg.theta), None)
        cond = model._conditioning(t, 0, None, None)
        h, _ = model._blocks(img, None, pos, cond, last=cfg.depth, tap=0)
        shift, scale = cond.img_rows.modulation(model.final_layer.adaLN_modulation, cond.vec, 2, group=2)
        out = modulate(h, shift, scale)
    assert v_frames.shape == (B, 8, 6) and v_actions.shape == (B, 3, 7)
    torch.testing.assert_close(v_frames, model.final_layer.vid_linear(out[:, :8]))
    torch.testing.assert_close(v_actions, model.final_layer.act_linear(out[:, 8:]))
    with pytest.raises(ValueError, match="one token tensor per modality"):
        model((frames,), t, ids, modality=("video", "action"))


def test_x_prediction_returns_the_velocity_its_clean_estimate_implies():
    """`prediction="x"`: the head's output is read as x0, and the model returns `(x_t - x0) / max(t, x_min_t)`
    (JiT). Checked against the same weights with `prediction="velocity"`, whose output is the raw head,
    for one timestep a sample, per-token timesteps (TwoTimesteps) and a joint sequence."""
    cfg = tiny()
    raw = randomised(cfg)
    model = build_mmdit(dataclasses.replace(cfg, prediction="x", x_min_t=0.05))
    model.load_state_dict(raw.state_dict())
    inp = inputs(cfg)
    inp["t"] = torch.tensor([0.7, 0.3, 0.01])  # the last is clamped to 0.05
    tt = TwoTimesteps(inp["t"], torch.tensor([0.2, 0.9, 0.5]), torch.rand(B, H * W) < 0.5)
    with torch.no_grad():
        for t in (inp["t"], tt):
            head = raw(**{**inp, "t": t})
            dense = t.dense() if isinstance(t, TwoTimesteps) else t[:, None].expand(-1, H * W)
            want = (inp["x"] - head) / dense.clamp(min=0.05)[..., None]
            torch.testing.assert_close(model(**{**inp, "t": t}), want)
    # joint sequence: each part divided by its own tokens' timesteps
    jcfg = tiny(modalities={"video": [6, 6], "action": [7, 7]}, context_dim=0)
    jraw = randomised(jcfg)
    jmodel = build_mmdit(dataclasses.replace(jcfg, prediction="x"))
    jmodel.load_state_dict(jraw.state_dict())
    frames, actions = torch.randn(B, 4, 6), torch.randn(B, 2, 7)
    ids = torch.zeros(B, 6, 4, dtype=torch.long)
    ids[:, :4, 1] = torch.arange(4)
    t = torch.cat((torch.zeros(B, 4), torch.full((B, 2), 0.5)), dim=1)  # observed frames at t = 0
    with torch.no_grad():
        hf, ha = jraw((frames, actions), t, ids, modality=("video", "action"))
        vf, va = jmodel((frames, actions), t, ids, modality=("video", "action"))
    torch.testing.assert_close(vf, (frames - hf) / 0.05)
    torch.testing.assert_close(va, (actions - ha) / 0.5)


# ---------------------------------------------------------------------------------------------- projector heads
def test_selfflow_projector_is_the_release_head_with_biases(reference):
    """The MMDiT's Self-Flow head has the public release's names, shapes and math (fixture: hidden 64)."""
    cfg = tiny(projector_dim=64)
    model = build_mmdit(cfg)
    release = {k: v for k, v in reference["state_dict"].items() if k.startswith("projector.")}
    own = {k: v for k, v in model.state_dict().items() if k.startswith("projector.")}
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in release.items()}
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in own.items() if k.endswith(".bias"))  # init
    model.load_state_dict(release, strict=False)
    sit = SiT(SiTConfig(**reference["config"]))
    sit.load_state_dict(reference["state_dict"])
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.projector(h), sit.projector(h))


def test_flux2_state_dict_loads_with_only_the_projector_missing():
    cfg = tiny(depth_double=2, depth_single=3, projector_dim=64)
    sd = flux2_state_dict(2, 3, dim=64, mlp=256, head=16, in_ch=16, ctx=32)
    missing, unexpected = MMDiT(cfg).load_state_dict(sd, strict=False)
    assert unexpected == [] and sorted(missing) == [
        f"projector.linear{i}.{p}" for i in (1, 2) for p in ("bias", "weight")
    ]


def test_repa_projector_is_repas_three_layer_mlp():
    """REPA models/sit.py build_mlp(hidden, 2048, z_dim): Linear -> SiLU -> Linear -> SiLU -> Linear, biases."""
    cfg = tiny(projector_dim=24, projector_kind="repa", projector_hidden=48)
    model = build_mmdit(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("projector.")}
    assert shapes == {
        "projector.0.weight": (48, 64),
        "projector.0.bias": (48,),
        "projector.2.weight": (48, 48),
        "projector.2.bias": (48,),
        "projector.4.weight": (24, 48),
        "projector.4.bias": (24,),
    }
    p, h = model.projector, torch.randn(3, 64)
    by_hand = F.silu(F.silu(h @ p[0].weight.T + p[0].bias) @ p[2].weight.T + p[2].bias) @ p[4].weight.T + p[4].bias
    torch.testing.assert_close(p(h), by_hand, rtol=0, atol=1e-6)


def test_projector_sizes_at_the_papers_width():
    """The release's head at D = d = 1152 is 5.3M parameters (the paper says about 10M); REPA's head at
    D = 1152 to DINOv2-B's 768 is 8.1M."""
    with torch.device("meta"):
        selfflow = MMDiT(MMDiTConfig.mmdit_625m()).projector
        repa = MMDiT(dataclasses.replace(MMDiTConfig.mmdit_625m(), projector_dim=768, projector_kind="repa")).projector
    assert count_parameters(selfflow) == 1152 * 2304 + 2304 + 2304 * 1152 + 1152 == 5_311_872
    assert count_parameters(repa) == 8_131_328
    with pytest.raises(ValueError, match="projector_kind"):
        tiny(projector_kind="mlp")
