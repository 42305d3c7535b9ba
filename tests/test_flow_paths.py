"""Flow path and timestep distributions, checked against CDFs written independently here."""

import math

import pytest
import torch
from reference_stats import ks_statistic, normal_cdf

from selfflow.flow.paths import (
    TimestepConfig,
    interpolate,
    sample_timesteps,
    shift_timesteps,
    timestep_density,
    velocity_target,
)

N = 200_000
KS_LIMIT = 1.63 / math.sqrt(N)  # Kolmogorov-Smirnov critical value at the 1% level


def plateau_cdf(u, m, s, w):
    """CDF of the flat-topped Gaussian in logit space, written out piecewise."""
    total = 2 * w + math.sqrt(2 * math.pi) * s
    half_tail = math.sqrt(2 * math.pi) * s / 2
    left = half_tail * 2 * normal_cdf((u - (m - w)) / s)
    mid = half_tail + (u - (m - w))
    right = half_tail + 2 * w + half_tail * (2 * normal_cdf((u - (m + w)) / s) - 1)
    return torch.where(u < m - w, left, torch.where(u <= m + w, mid, right)) / total


CASES = {
    "uniform": (TimestepConfig("uniform"), lambda t: t),
    "uniform_shift3": (TimestepConfig("uniform", shift=3.0), lambda t: t / (3.0 - 2.0 * t)),
    "logit_normal": (
        TimestepConfig("logit_normal", mean=0.3, std=0.8),
        lambda t: normal_cdf((torch.log(t / (1 - t)) - 0.3) / 0.8),
    ),
    "plateau": (
        TimestepConfig("plateau_logit_normal", mean=-0.2, std=0.7, plateau=1.2),
        lambda t: plateau_cdf(torch.log(t / (1 - t)), -0.2, 0.7, 1.2),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_timestep_distribution_matches_cdf(name):
    cfg, cdf = CASES[name]
    t = sample_timesteps(cfg, N, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 1
    assert ks_statistic(t, cdf) < KS_LIMIT


@pytest.mark.parametrize("name", ["logit_normal", "plateau"])
def test_density_integrates_to_cdf(name):
    """The density used for plots agrees with the CDF (numerical integration)."""
    cfg, cdf = CASES[name]
    t = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    integral = torch.cumulative_trapezoid(timestep_density(cfg, t), t)
    torch.testing.assert_close(integral, cdf(t[1:]) - cdf(t[:1]), rtol=0, atol=2e-4)


def test_shift_moves_mass_to_noise_and_keeps_endpoints():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    s = shift_timesteps(t, 3.0)
    assert s[0] == 0 and s[-1] == 1
    assert torch.all(s[1:-1] > t[1:-1])
    torch.testing.assert_close(s[2], torch.tensor(0.75))
    assert torch.equal(shift_timesteps(t, 1.0), t)


def test_interpolation_and_target():
    x0, noise = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    t = torch.tensor([0.0, 1.0])
    xt = interpolate(x0, noise, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], noise[1])
    t_tok = torch.rand(2, 5)
    expected = (1 - t_tok[..., None]) * x0 + t_tok[..., None] * noise
    torch.testing.assert_close(interpolate(x0, noise, t_tok), expected)
    # d/dt of the path is the target velocity
    eps = 1e-3
    deriv = (interpolate(x0, noise, t_tok + eps) - interpolate(x0, noise, t_tok)) / eps
    torch.testing.assert_close(deriv, velocity_target(x0, noise), rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"distribution": "beta"}, "distribution"), ({"std": 0}, "std"), ({"shift": -1}, "shift")]
)
def test_timestep_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TimestepConfig(**kwargs)
