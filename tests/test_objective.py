"""Training objective: dual-timestep noising, loss values by hand, ablation switches, REPA encoder.

Statistical checks use fixed seeds and state their tolerance; each also checks that it would reject
a plausible wrong answer, so a pass means something.
"""

import json
import math
import re
from dataclasses import replace

import pytest
import torch
from reference_stats import ks_statistic, normal_cdf
from torch import nn

from selfflow.eval.encoders import RepaEncoder
from selfflow.flow.paths import TimestepConfig
from selfflow.training.objective import (
    ObjectiveConfig,
    drop_condition,
    noise_batch,
    representation_loss,
    training_loss,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def binomial_tolerance(p: float, n: int, sigmas: float = 5.0) -> float:
    """`sigmas` standard errors of a binomial proportion over n independent draws."""
    return sigmas * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------- noising


@pytest.mark.parametrize("ratio", [0.25, 0.10, 0.50])
def test_mask_ratio(ratio):
    B, L = 64, 1024
    noised = noise_batch(torch.zeros(B, L, 2), TimestepConfig(), ratio, ObjectiveConfig(), gen(0))
    assert noised.mask.dtype == torch.bool and noised.mask.shape == (B, L)
    tol = binomial_tolerance(ratio, B * L)  # 5 sigma: 0.0085 for 0.25, 0.0059 for 0.10, 0.0098 for 0.50
    assert abs(noised.mask.float().mean().item() - ratio) < tol
    # per token, not per sample: every sample mixes masked and unmasked tokens
    per_sample = noised.mask.float().mean(dim=1)
    assert (per_sample > 0).all() and (per_sample < 1).all()


def unshift(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of `t' = shift t / (1 + (shift - 1) t)`."""
    return x / (shift - (shift - 1) * x)


def uniform_shift_cdf(shift: float):
    return lambda x: unshift(x, shift)


def logit_normal_cdf(mean: float, std: float, shift: float = 1.0):
    return lambda x: normal_cdf((torch.logit(unshift(x, shift)) - mean) / std)


KS_N = 20_000  # samples; one token each, so the KS sample is i.i.d.
KS_CRITICAL = 1.95 / math.sqrt(KS_N)  # Kolmogorov-Smirnov critical value at the 0.1% level (0.0138)


@pytest.mark.parametrize(
    "timesteps, cdf",
    [
        (TimestepConfig("uniform", shift=3.0), uniform_shift_cdf(3.0)),
        (TimestepConfig("logit_normal", mean=0.0, std=1.0), logit_normal_cdf(0.0, 1.0)),
        (TimestepConfig("logit_normal", mean=-0.4, std=0.8, shift=2.0), logit_normal_cdf(-0.4, 0.8, 2.0)),
    ],
)
def test_token_timestep_marginal(timesteps, cdf):
    """Per-token tau keeps the configured distribution; the teacher's min(t, s) does not (CDF 1 - (1 - F)^2)."""
    L = 8
    noised = noise_batch(torch.zeros(KS_N, L, 1), timesteps, 0.5, ObjectiveConfig(), gen(1))
    # tokens of one sample share t or s, so take one random token per sample
    pick = torch.randint(L, (KS_N,), generator=gen(2))
    tau = noised.tau[torch.arange(KS_N), pick]
    assert ks_statistic(tau, cdf) < KS_CRITICAL

    def min_cdf(x):
        return 1 - (1 - cdf(x)) ** 2

    assert ks_statistic(noised.tau_teacher, min_cdf) < KS_CRITICAL
    # power: the test tells the two distributions apart
    assert ks_statistic(tau, min_cdf) > KS_CRITICAL
    assert ks_statistic(noised.tau_teacher, cdf) > KS_CRITICAL


def test_student_and_teacher_inputs():
    B, L, C = 6, 10, 3
    x0 = torch.randn(B, L, C, generator=gen(3))
    n = noise_batch(x0, TimestepConfig(), 0.25, ObjectiveConfig(), gen(4))
    assert n.t.shape == n.s.shape == n.tau_teacher.shape == (B,)
    assert not torch.equal(n.t, n.s)  # drawn independently
    assert torch.equal(n.tau_teacher, torch.minimum(n.t, n.s))
    m = n.tau_teacher[:, None, None]
    torch.testing.assert_close(n.x_teacher, (1 - m) * x0 + m * n.noise, rtol=0, atol=1e-6)

    tau = torch.empty(B, L)
    for b in range(B):
        for i in range(L):
            tau[b, i] = n.s[b] if n.mask[b, i] else n.t[b]
    assert torch.equal(n.tau, tau)
    torch.testing.assert_close(n.x_student, (1 - tau[..., None]) * x0 + tau[..., None] * n.noise, rtol=0, atol=1e-6)


def test_noise_batch_is_a_function_of_the_seed():
    x0 = torch.randn(4, 16, 2, generator=gen(5))
    a = noise_batch(x0, TimestepConfig(), 0.25, ObjectiveConfig(), gen(7))
    b = noise_batch(x0, TimestepConfig(), 0.25, ObjectiveConfig(), gen(7))
    c = noise_batch(x0, TimestepConfig(), 0.25, ObjectiveConfig(), gen(8))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.noise, c.noise)


def test_noise_batch_dtype():
    n = noise_batch(torch.zeros(2, 4, 3, dtype=torch.float64), TimestepConfig(), 0.25, ObjectiveConfig(), gen(0))
    assert n.noise.dtype == n.x_student.dtype == n.x_teacher.dtype == torch.float64
    assert n.t.dtype == n.tau.dtype == torch.float32


# ---------------------------------------------------------------- losses by hand


def fixed_linear(n_in: int, n_out: int, seed: int) -> nn.Linear:
    lin = nn.Linear(n_in, n_out)
    g = gen(seed)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g))
        lin.bias.copy_(torch.randn(n_out, generator=g))
    return lin


class ToyNets:
    """Student: h = embed(x) + t a, v = head(h), features = proj(h). Teacher: embed_t(x) + t a_t."""

    def __init__(self, C: int = 4, D: int = 6):
        self.embed, self.head, self.proj = fixed_linear(C, D, 10), fixed_linear(D, C, 11), fixed_linear(D, D, 12)
        self.embed_t = fixed_linear(C, D, 13)
        self.a = torch.randn(D, generator=gen(14))
        self.a_t = torch.randn(D, generator=gen(15))
        self.student_calls, self.teacher_calls = [], []

    def student(self, x, t, layer):
        t = t.dense()  # the student is given TwoTimesteps(t, s, mask)
        self.student_calls.append((t.clone(), layer))
        h = self.embed(x) + t.reshape(t.shape[0], -1, 1) * self.a
        v = self.head(h)
        return v if layer is None else (v, self.proj(h))

    def teacher(self, x, t, layer):
        h = self.embed_t(x) + t.reshape(t.shape[0], -1, 1) * self.a_t
        self.teacher_calls.append((t.clone(), layer, h.requires_grad, torch.is_grad_enabled()))
        return h

    def student_params(self):
        return [*self.embed.parameters(), *self.head.parameters(), *self.proj.parameters()]


def by_hand(nets: ToyNets, x, tau):
    """(velocity, features) of the toy student with explicit matrix products."""
    h = x @ nets.embed.weight.T + nets.embed.bias + tau[..., None] * nets.a
    v = h @ nets.head.weight.T + nets.head.bias
    z = h @ nets.proj.weight.T + nets.proj.bias
    return v, z


def hand_case(cfg: ObjectiveConfig):
    B, L, C = 3, 5, 4
    x0 = torch.randn(B, L, C, generator=gen(20))
    return x0, noise_batch(x0, TimestepConfig(), 0.4, cfg, gen(21))


def test_selfflow_loss_by_hand():
    cfg = ObjectiveConfig(gamma=0.8, student_layer=2, teacher_layer=5)
    x0, n = hand_case(cfg)
    nets = ToyNets()
    terms = training_loss(cfg, x0, n, nets.student, nets.teacher)

    tau = torch.where(n.mask, n.s[:, None], n.t[:, None])
    x_s = (1 - tau[..., None]) * x0 + tau[..., None] * n.noise
    m = torch.minimum(n.t, n.s)[:, None, None]
    x_t = (1 - m) * x0 + m * n.noise
    with torch.no_grad():
        v, z = by_hand(nets, x_s, tau)
        target = x_t @ nets.embed_t.weight.T + nets.embed_t.bias + m * nets.a_t
        fm = ((v - (n.noise - x0)) ** 2).mean()
        cos = (z * target).sum(-1) / (z.norm(dim=-1) * target.norm(dim=-1))
        rep = -cos.mean()
    torch.testing.assert_close(terms.fm, fm, rtol=0, atol=1e-6)
    torch.testing.assert_close(terms.rep, rep, rtol=0, atol=1e-6)
    torch.testing.assert_close(terms.total, fm + 0.8 * rep, rtol=0, atol=1e-6)
    assert terms.fm.item() > 0.5 and -1 < terms.rep.item() < 1  # a non-trivial case

    [(t_student, layer_student)] = nets.student_calls
    [(t_teacher, layer_teacher, out_grad, grad_enabled)] = nets.teacher_calls
    assert layer_student == 2 and layer_teacher == 5
    assert torch.equal(t_student, tau) and torch.equal(t_teacher, torch.minimum(n.t, n.s))
    assert not out_grad and not grad_enabled  # teacher runs under no_grad

    terms.total.backward()
    assert all(p.grad is None for p in nets.embed_t.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.student_params())


def never_called(*args):
    raise AssertionError("the teacher must not run")


@pytest.mark.parametrize("cfg", [ObjectiveConfig(gamma=0.0), ObjectiveConfig(method="fm")])
def test_flow_matching_only(cfg):
    x0, n = hand_case(cfg)
    nets = ToyNets()
    terms = training_loss(cfg, x0, n, nets.student, never_called)
    [(t_student, layer)] = nets.student_calls
    assert layer is None  # no features requested
    with torch.no_grad():
        v, _ = by_hand(nets, n.x_student, n.tau)
        fm = ((v - (n.noise - x0)) ** 2).mean()
    torch.testing.assert_close(terms.fm, fm, rtol=0, atol=1e-6)
    assert terms.rep.shape == () and terms.rep.item() == 0
    assert torch.equal(terms.total, terms.fm)
    if cfg.method == "fm":
        assert not n.mask.any() and torch.equal(t_student, n.t[:, None].expand_as(n.tau))
    else:  # Self-Flow without the representation loss keeps the dual-timestep input
        assert n.mask.any() and torch.equal(t_student, torch.where(n.mask, n.s[:, None], n.t[:, None]))


@pytest.mark.parametrize("method", ["fm", "selfflow"])
def test_contrastive_flow_matching_by_hand(method):
    """Delta-FM: total = fm - lambda * mse(v_i, target of item i - 1), the logged fm stays the plain MSE."""
    cfg = ObjectiveConfig(method=method, contrastive_weight=0.05, student_layer=2, teacher_layer=5)
    x0, n = hand_case(cfg)
    nets = ToyNets()
    terms = training_loss(cfg, x0, n, nets.student, nets.teacher)
    plain = training_loss(replace(cfg, contrastive_weight=0.0), x0, n, ToyNets().student, ToyNets().teacher)
    with torch.no_grad():
        v, _ = by_hand(nets, n.x_student, n.tau)
        targets = n.noise - x0
        negative = sum(((v[i] - targets[i - 1]) ** 2).mean() for i in range(len(x0))) / len(x0)  # 0's is item B-1's
        fm = ((v - targets) ** 2).mean()
    torch.testing.assert_close(terms.fm, fm, rtol=0, atol=1e-6)
    # fm: everything by hand; selfflow: the plain total is test_selfflow_loss_by_hand's, checked there
    expected = fm if method == "fm" else plain.total
    torch.testing.assert_close(terms.total, expected - 0.05 * negative, rtol=0, atol=1e-6)
    assert negative.item() > fm.item()  # another item's target is farther: the term is not a copy of fm

    one = noise_batch(x0[:1], TimestepConfig(), 0.4, cfg, gen(21))
    with pytest.raises(ValueError, match="at least 2 items"):
        training_loss(cfg, x0[:1], one, ToyNets().student, ToyNets().teacher)


def test_selfflow_needs_a_teacher():
    cfg = ObjectiveConfig()
    x0, n = hand_case(cfg)
    with pytest.raises(ValueError, match="teacher"):
        training_loss(cfg, x0, n, ToyNets().student)


def test_repa_loss_by_hand():
    cfg = ObjectiveConfig(method="repa", gamma=0.5, student_layer=3)
    x0, n = hand_case(cfg)
    target = torch.randn(*x0.shape[:2], 6, generator=gen(30))
    nets = ToyNets()
    terms = training_loss(cfg, x0, n, nets.student, never_called, target_features=target)
    [(t_student, layer)] = nets.student_calls
    assert layer == 3 and not n.mask.any() and torch.equal(t_student, n.t[:, None].expand_as(n.tau))
    t = n.t[:, None, None]
    with torch.no_grad():
        v, z = by_hand(nets, (1 - t) * x0 + t * n.noise, n.t[:, None].expand_as(n.tau))
        fm = ((v - (n.noise - x0)) ** 2).mean()
        rep = -((z * target).sum(-1) / (z.norm(dim=-1) * target.norm(dim=-1))).mean()
    torch.testing.assert_close(terms.total, fm + 0.5 * rep, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="target_features"):
        training_loss(cfg, x0, n, nets.student)


# ---------------------------------------------------------------- ablations


def test_no_masking_ablation():
    cfg = ObjectiveConfig(masking=False)
    x0 = torch.randn(8, 32, 2, generator=gen(40))
    n = noise_batch(x0, TimestepConfig(), 0.5, cfg, gen(41))
    assert not n.mask.any()
    assert torch.equal(n.tau, n.t[:, None].expand(8, 32))
    assert torch.equal(n.tau_teacher, torch.minimum(n.t, n.s)) and (n.s != n.t).all()  # teacher still at min


def test_slightly_cleaner_ablation():
    cfg = ObjectiveConfig(second_timestep="slightly_cleaner", cleaner_delta=0.05)
    n = noise_batch(torch.zeros(256, 4, 1), TimestepConfig(), 0.25, cfg, gen(42))
    assert torch.equal(n.s, (n.t - 0.05).clamp(min=0))
    assert (n.s == 0).any() and (n.s > 0).any()  # the clamp is exercised
    assert torch.equal(n.tau_teacher, n.s)


def test_l2_representation_loss():
    pred, target = torch.randn(2, 5, 7, generator=gen(50)), torch.randn(2, 5, 7, generator=gen(51))
    # per-token mean squared error (over channels), averaged over tokens: the flow-matching MSE's scale
    expected = sum(((pred[b, i] - target[b, i]) ** 2).mean() for b in range(2) for i in range(5)) / 10
    torch.testing.assert_close(representation_loss(pred, target, "l2"), expected, rtol=0, atol=1e-6)
    summed = sum(((pred[b, i] - target[b, i]) ** 2).sum() for b in range(2) for i in range(5)) / 10
    assert abs(representation_loss(pred, target, "l2").item() - summed.item()) > 1  # not the per-token sum
    with pytest.raises(ValueError, match="shape"):
        representation_loss(pred, target[..., :6], "cosine")


def test_representation_loss_in_float32():
    pred = torch.randn(2, 3, 8, generator=gen(52)).to(torch.bfloat16)
    assert representation_loss(pred, pred, "cosine").dtype == torch.float32


# ---------------------------------------------------------------- condition dropout


def test_drop_condition():
    n, p = 200_000, 0.1
    keep = drop_condition(n, p, gen(60))
    assert keep.dtype == torch.bool and keep.shape == (n,)
    tol = binomial_tolerance(p, n)  # 5 sigma = 0.0034
    assert abs((~keep).float().mean().item() - p) < tol
    assert torch.equal(keep, drop_condition(n, p, gen(60)))
    assert not torch.equal(keep, drop_condition(n, p, gen(61)))
    assert drop_condition(100, 0.0, gen(0)).all() and not drop_condition(100, 1.0, gen(0)).any()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("method", "ddpm"),
        ("gamma", -0.1),
        ("gamma", float("nan")),
        ("student_layer", 0),
        ("teacher_layer", 1.5),
        ("rep_loss", "l1"),
        ("masking", "yes"),
        ("second_timestep", "later"),
        ("cleaner_delta", 1.5),
        ("cond_dropout", -0.1),
        ("cond_dropout", 1.1),
        ("contrastive_weight", -0.1),
        ("contrastive_weight", 1.0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} "):
        ObjectiveConfig(**{field: value})


# ---------------------------------------------------------------- REPA encoder

GRID = 4  # tiny encoders: image 16, patch 4


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    """Tiny random ViT, DINOv2 and DINOv2-with-registers saved to local folders."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        ViTConfig,
        ViTModel,
    )

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16)
    models = {
        "vit": (ViTModel, ViTConfig(intermediate_size=64, **small), 0),
        "dinov2": (Dinov2Model, Dinov2Config(mlp_ratio=2, **small), 0),
        "dinov2_reg": (
            Dinov2WithRegistersModel,
            Dinov2WithRegistersConfig(num_register_tokens=2, mlp_ratio=2, **small),
            2,
        ),
    }
    root = tmp_path_factory.mktemp("encoders")
    dirs = {}
    for name, (cls, config, registers) in models.items():
        torch.manual_seed(0)
        cls(config).eval().save_pretrained(root / name)
        dirs[name] = (root / name, registers)
    return dirs


def patch_tokens(encoder: RepaEncoder, pixels: torch.Tensor, registers: int) -> torch.Tensor:
    with torch.no_grad():
        return encoder.model(pixel_values=pixels).last_hidden_state[:, 1 + registers :]


def images(size: int, seed: int = 70) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=gen(seed)) * 2 - 1


@pytest.mark.parametrize("name", ["vit", "dinov2", "dinov2_reg"])
def test_repa_encoder_native_grid(encoder_dirs, name):
    """At the model's own grid the output is the patch tokens (CLS and registers dropped), (h w) order kept."""
    path, registers = encoder_dirs[name]
    enc = RepaEncoder(path, image_size=16)  # DINOv2's own default input is REPA's 224 (next test)
    x = images(16)
    expected = patch_tokens(enc, ((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD, registers)
    out = enc(x, (GRID, GRID))
    assert out.shape == (2, GRID * GRID, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)

    # width 4 -> 2 with bilinear, align_corners=False, averages column pairs; rows unchanged
    half = enc(x, (GRID, GRID // 2))
    grid = expected.reshape(2, GRID, GRID, 32)
    torch.testing.assert_close(half, ((grid[:, :, 0::2] + grid[:, :, 1::2]) / 2).reshape(2, -1, 32))


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_repa_encoder_resized_grid(encoder_dirs, name):
    enc = RepaEncoder(encoder_dirs[name][0])
    x = images(24).requires_grad_(True)
    out = enc(x, (3, 5))
    assert out.shape == (2, 15, 32)
    assert not out.requires_grad and not enc.model.training
    assert not any(p.requires_grad for p in enc.model.parameters())
    assert torch.equal(out, enc(x, (3, 5)))


def test_repa_encoder_uses_processor_stats(encoder_dirs, tmp_path):
    path, _ = encoder_dirs["dinov2"]
    folder = tmp_path / "with_processor"
    folder.mkdir()
    for f in path.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    enc = RepaEncoder(folder, image_size=16)
    x = images(16)
    torch.testing.assert_close(enc(x, (GRID, GRID)), patch_tokens(enc, x, 0), rtol=0, atol=1e-6)  # (x+1)/2 -> x


@pytest.mark.parametrize("name", ["dinov2", "dinov2_reg"])
def test_repa_encoder_feeds_dinov2_at_224_as_repa(encoder_dirs, name):
    """REPA train.py preprocess_raw_image for DINOv2: /255, ImageNet mean/std, then bicubic to 224."""
    path, registers = encoder_dirs[name]
    enc = RepaEncoder(path)
    assert enc.image_size == 224 and enc.patch_grid == 56
    x = images(32)
    repa = torch.nn.functional.interpolate(((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD, 224, mode="bicubic")
    torch.testing.assert_close(enc(x, (56, 56)), patch_tokens(enc, repa, registers), rtol=0, atol=2e-5)
    bilinear = torch.nn.functional.interpolate((x + 1) / 2, 224, mode="bilinear", antialias=True)
    wrong = patch_tokens(enc, (bilinear - IMAGENET_MEAN) / IMAGENET_STD, registers)
    assert (enc(x, (56, 56)) - wrong).abs().max() > 1e-3  # the resize mode matters at this tolerance
    assert RepaEncoder(encoder_dirs["vit"][0]).image_size == 16  # other encoders: their config's size


def test_repa_encoder_missing_folder(tmp_path):
    missing = tmp_path / "no_such_encoder"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        RepaEncoder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        RepaEncoder(empty)
