"""Samplers: the public SDE (fixture), ODE samplers on a Gaussian problem solved in closed form."""

import pytest
import torch

from selfflow.backbone.sit import SiT, SiTConfig
from selfflow.flow.samplers import PerSampleNoise, SamplerConfig, sample
from selfflow.modalities.grid import patchify, unpatchify


@pytest.mark.parametrize("run", ["sde_8steps", "sde_8steps_cfg2"])
def test_sde_reproduces_public_sampler(reference, run):
    r = reference[run]
    cfg_model = SiTConfig(**reference["config"])
    model = SiT(cfg_model)
    model.load_state_dict(reference["state_dict"])
    model.eval()
    noise, ids = patchify(r["noise"], cfg_model.patch_size)
    cfg = SamplerConfig(kind="sde", num_steps=8, cfg_scale=r["cfg_scale"], cfg_interval=list(r["guidance_interval"]))
    torch.manual_seed(r["sampler_seed"])
    tokens = sample(lambda x, t, y: model(x, t, y), noise, r["labels"], cfg, null_label=r["null_label"])
    latents = unpatchify(tokens, ids, cfg_model.patch_size, cfg_model.in_channels, cfg_model.grid, cfg_model.grid)
    torch.testing.assert_close(latents, r["latents"], rtol=0, atol=1e-4)


# Data x0 ~ N(mu, sigma^2) per coordinate, noise ~ N(0, 1). With a = 1 - t the marginal of x_t
# is N(a mu, a^2 sigma^2 + t^2) and the exact velocity E[noise - x0 | x_t] is linear in x_t.
# The probability-flow ODE maps noise z (t = 1) to exactly mu + sigma * z (t = 0).
MU, SIGMA = 1.5, 0.3


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    t = t.double().reshape(-1, *([1] * (x.ndim - 1)))
    a = 1 - t
    var = a**2 * SIGMA**2 + t**2
    centred = x.double() - a * MU
    e_x0 = MU + a * SIGMA**2 / var * centred
    e_noise = t / var * centred
    return (e_noise - e_x0).to(x.dtype)


def _noise(n: int = 512) -> torch.Tensor:
    return torch.randn(n, 4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _ode_error(kind: str, steps: int, shift: float = 1.0) -> float:
    z = _noise()
    out = sample(
        gaussian_velocity, z, torch.zeros(len(z)), SamplerConfig(kind=kind, num_steps=steps, sample_shift=shift)
    )
    return (out - (MU + SIGMA * z)).abs().max().item()


@pytest.mark.parametrize(("kind", "order"), [("euler", 1), ("heun", 2)])
def test_ode_converges_to_closed_form_at_its_order(kind, order):
    """Doubling the steps divides the error by about 2**order."""
    errors = [_ode_error(kind, n) for n in (40, 80, 160)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(0.85 * 2**order < r < 1.15 * 2**order for r in ratios), (errors, ratios)


def test_ode_closed_form_with_shift():
    assert _ode_error("heun", 160, shift=3.0) < 5e-4
    assert _ode_error("euler", 400, shift=1.0) < 6e-3


def test_heun_beats_euler_at_equal_steps():
    assert _ode_error("heun", 20) < _ode_error("euler", 20) / 10


def test_sde_samples_the_data_distribution():
    """Euler-Maruyama with the exact score lands on N(mu, sigma^2) (mean and std, 4096 draws)."""
    z = torch.randn(4096, 8, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.manual_seed(2)
    out = sample(gaussian_velocity, z, torch.zeros(len(z)), SamplerConfig(kind="sde", num_steps=250))
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - SIGMA) < 0.02


def test_guidance_extrapolates_velocity():
    """With v = c * y the guided velocity is c * (y_u + w (y_c - y_u)): x(0) = z - w c exactly."""
    z = _noise(8)
    calls = []

    def model_fn(x, t, y):
        calls.append(len(x))
        return 0.25 * y.to(x.dtype).reshape(-1, 1, 1).expand_as(x)

    labels = torch.ones(len(z), dtype=torch.long)
    plain = sample(model_fn, z, labels, SamplerConfig(kind="euler", num_steps=10))
    assert set(calls) == {8}
    torch.testing.assert_close(plain, z - 0.25)
    guided = sample(model_fn, z, labels, SamplerConfig(kind="euler", num_steps=10, cfg_scale=3.0), null_label=0)
    assert set(calls) == {8, 16}
    torch.testing.assert_close(guided, z - 0.75)


def test_cfg_interval_limits_guidance():
    """Euler grid t = 1.0, 0.9, ..., 0.1: guidance (w = 3) applies at the 5 steps with t <= 0.5 only."""
    z = _noise(8)
    steps = []

    def model_fn(x, t, y):
        steps.append(float(t[0]))
        return 0.25 * y.to(x.dtype).reshape(-1, 1, 1).expand_as(x)

    cfg = SamplerConfig(kind="euler", num_steps=10, cfg_scale=3.0, cfg_interval=[0.0, 0.5])
    out = sample(model_fn, z, torch.ones(len(z), dtype=torch.long), cfg, null_label=0)
    assert len(steps) == 10
    torch.testing.assert_close(out, z - 0.25 * (5 * 0.1) - 0.75 * (5 * 0.1))


def test_per_sample_noise_is_batch_invariant():
    """A sample's SDE result depends only on its own seed, not on what else is in the batch."""
    cfg = SamplerConfig(kind="sde", num_steps=20, cfg_scale=2.0, cfg_interval=[0.0, 0.7])
    seeds = [10, 11, 12, 13]

    def run(idx):
        src = PerSampleNoise([seeds[i] for i in idx])
        z = torch.stack([torch.randn(3, 2, generator=torch.Generator().manual_seed(seeds[i] + 99)) for i in idx])
        return sample(gaussian_velocity, z, torch.ones(len(idx)), cfg, null_label=0, noise_source=src)

    full = run([0, 1, 2, 3])
    torch.testing.assert_close(run([2]), full[2:3], rtol=0, atol=1e-6)
    torch.testing.assert_close(run([3, 1]), full[[3, 1]], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "ddim"}, "kind"),
        ({"num_steps": 0}, "num_steps"),
        ({"cfg_interval": [0.8, 0.2]}, "cfg_interval"),
        ({"kind": "sde", "sample_shift": 3.0}, "sample_shift"),
    ],
)
def test_sampler_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)
