"""SiT trunk against the public Self-Flow release (fixture) plus its own invariants."""

import pytest
import torch
from conftest import assert_release

from selfflow.backbone.checkpoint import load_weights
from selfflow.backbone.sit import SiT, SiTConfig, sincos_2d_table
from selfflow.modalities.grid import patchify


@pytest.fixture(scope="module")
def public_model(reference):
    model = SiT(SiTConfig(**reference["config"]))
    report = load_weights(model, reference["state_dict"], strict=True)
    assert not report.missing and not report.unexpected
    return model.eval()


def test_fixture_tokens_are_our_patchify(reference):
    tokens, ids = patchify(reference["latents"], reference["config"]["patch_size"])
    torch.testing.assert_close(tokens, reference["x"], rtol=0, atol=0)
    assert torch.equal(ids, reference["x_ids"])


def test_pos_embed_table_equals_checkpoint(reference):
    cfg = SiTConfig(**reference["config"])
    table = sincos_2d_table(cfg.hidden_size, cfg.grid)[None]
    torch.testing.assert_close(table, reference["state_dict"]["pos_embed"], rtol=0, atol=1e-6)


@torch.no_grad()
def test_velocity_scalar_t(public_model, reference):
    r = reference
    v = public_model(r["x"], r["t_scalar"], r["y"], r["x_ids"])
    assert_release(v, r["v_scalar_t"])


@torch.no_grad()
def test_velocity_per_token_t(public_model, reference):
    r = reference
    v = public_model(r["x"], r["t_token"], r["y"], r["x_ids"])
    assert_release(v, r["v_token_t"])


@torch.no_grad()
def test_student_features(public_model, reference):
    r = reference
    out = public_model.forward_with_features(r["x"], r["t_token"], r["y"], r["x_ids"], layer=r["student_layer"])
    assert_release(out.features, r["student_features_l2"])
    assert_release(out.velocity, r["v_with_features"])


@torch.no_grad()
def test_teacher_features_stop_early(public_model, reference):
    r = reference
    k = r["teacher_layer"]
    calls = []
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, b in enumerate(public_model.blocks)]
    hooks.append(public_model.final_layer.register_forward_hook(lambda *_: calls.append("final")))
    try:
        h = public_model.hidden_states(r["x"], r["t_scalar"], r["y"], r["x_ids"], layer=k)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == list(range(k))
    assert_release(h, r["teacher_raw_features_l4"])


@torch.no_grad()
def test_per_token_equal_t_is_scalar_t(public_model, reference):
    r = reference
    t_tok = r["t_scalar"][:, None].expand_as(r["t_token"])
    assert torch.equal(public_model(r["x"], t_tok, r["y"], r["x_ids"]), public_model(r["x"], r["t_scalar"], r["y"]))


@torch.no_grad()
def test_ids_place_tokens(public_model, reference):
    """Tokens given in a shuffled order with their ids give the same (shuffled) velocities."""
    r = reference
    perm = torch.randperm(r["x"].shape[1], generator=torch.Generator().manual_seed(0))
    v = public_model(r["x"][:, perm], r["t_token"][:, perm], r["y"], r["x_ids"][:, perm])
    torch.testing.assert_close(v, r["v_token_t"][:, perm], rtol=0, atol=1e-4)


def test_bad_inputs_name_the_argument(public_model, reference):
    r = reference
    with pytest.raises(ValueError, match="x must be"):
        public_model(r["x"][..., :5], r["t_scalar"], r["y"])
    with pytest.raises(ValueError, match="t must be"):
        public_model(r["x"], r["t_scalar"][:2], r["y"])
    with pytest.raises(ValueError, match="y must be"):
        public_model(r["x"], r["t_scalar"], r["y"][:1])
    with pytest.raises(ValueError, match="feature layer"):
        public_model.hidden_states(r["x"], r["t_scalar"], r["y"], layer=99)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("depth", 0, "depth"), ("num_heads", 5, "num_heads"), ("patch_size", 3, "patch_size")],
)
def test_config_rejects_impossible_values(field, value, message):
    kwargs = {"input_size": 8, "hidden_size": 64, "depth": 2, "num_heads": 4, field: value}
    with pytest.raises(ValueError, match=message):
        SiTConfig(**kwargs)


def test_xl2_parameter_count():
    """SiT-XL/2 is the ~675M model of the paper (projector included: ~678M)."""
    with torch.device("meta"):
        model = SiT(SiTConfig.xl_2())
    n = sum(p.numel() for p in model.parameters())
    assert 670e6 < n < 685e6, n


def test_activation_checkpointing_matches(reference):
    cfg = SiTConfig(**reference["config"])
    plain, ckpt = SiT(cfg), SiT(SiTConfig(**reference["config"], grad_checkpointing=True))
    plain.load_state_dict(reference["state_dict"])
    ckpt.load_state_dict(reference["state_dict"])
    r = reference
    for model in (plain, ckpt):
        model(r["x"], r["t_token"], r["y"], r["x_ids"]).square().mean().backward()
    for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    assert plain.blocks[0].attn.qkv.weight.grad is not None


@torch.no_grad()
def test_two_timesteps_give_the_per_token_output(public_model, reference, monkeypatch):
    """The student's (t, s, mask) input builds its rows without `torch.unique`: the per-token tensor's
    output up to float round-off at the values' scale, and t = s gives the scalar output bit for bit."""
    from selfflow.backbone.layers import TwoTimesteps

    r = reference
    t = r["t_scalar"]
    s = torch.rand(t.shape, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(r["t_token"].shape, generator=torch.Generator().manual_seed(1)) < 0.25
    two = TwoTimesteps(t, s, mask)
    dense, scalar = public_model(r["x"], two.dense(), r["y"], r["x_ids"]), public_model(r["x"], t, r["y"], r["x_ids"])
    monkeypatch.setattr(torch, "unique", None)
    assert_release(public_model(r["x"], two, r["y"], r["x_ids"]), dense)
    assert torch.equal(public_model(r["x"], TwoTimesteps(t, t, mask), r["y"], r["x_ids"]), scalar)
