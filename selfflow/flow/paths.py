"""Rectified-flow path and timestep distributions, as pure functions (DESIGN.md sections 1 and 3).

`t` in [0, 1] is the noise level: `x_t = (1 - t) * x0 + t * noise`, target velocity
`noise - x0`. Timesteps are drawn from uniform, logit-normal or plateau logit-normal
distributions and then shifted with `t' = shift * t / (1 + (shift - 1) * t)`.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DISTRIBUTIONS = ("uniform", "logit_normal", "plateau_logit_normal")
AUTO = "auto"  # a training config's placeholder: the job replaces it by the autoencoder's distribution


@dataclass
class TimestepConfig:
    """One modality's training timestep distribution.

    `plateau_logit_normal` is a flat-topped Gaussian in logit space: density proportional to
    `exp(-max(|u - mean| - plateau, 0)^2 / (2 std^2))`, i.e. a logit-normal whose central
    `[mean - plateau, mean + plateau]` band is flat. The paper does not define its plateau
    width; `plateau = 1.0` is this project's default. `distribution="auto"` is a placeholder that
    `selfflow train` resolves from the data's autoencoder before sampling (it cannot be sampled).
    """

    distribution: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    plateau: float = 1.0
    shift: float = 1.0

    def __post_init__(self):
        if self.distribution not in (*DISTRIBUTIONS, AUTO):
            raise ValueError(f"distribution must be one of {(*DISTRIBUTIONS, AUTO)}, got {self.distribution!r}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.plateau < 0:
            raise ValueError(f"plateau must be >= 0, got {self.plateau}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """`(1 - t) * x0 + t * noise`; t is `(B,)` (one per sample) or `(B, L)` (one per token)."""
    t = t.reshape(*t.shape, *([1] * (x0.ndim - t.ndim))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow velocity `d x_t / d t = noise - x0`."""
    return noise - x0


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """`shift * t / (1 + (shift - 1) * t)`: shift > 1 moves mass towards noise (t = 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(cfg: TimestepConfig, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw `n` timesteps from `cfg` (shift included), float32 on CPU."""
    if cfg.distribution == AUTO:
        raise ValueError("timestep distribution 'auto' must be resolved (from the autoencoder) before sampling")
    if cfg.distribution == "uniform":
        t = torch.rand(n, generator=generator)
    elif cfg.distribution == "logit_normal":
        t = torch.sigmoid(cfg.mean + cfg.std * torch.randn(n, generator=generator))
    else:  # plateau_logit_normal
        t = torch.sigmoid(_plateau_normal(cfg, n, generator))
    return shift_timesteps(t, cfg.shift)


def _plateau_normal(cfg: TimestepConfig, n: int, generator: torch.Generator | None) -> Tensor:
    """Exact draws of the flat-topped Gaussian: the flat band has mass 2w / (2w + sqrt(2 pi) std)."""
    w, s = cfg.plateau, cfg.std
    p_flat = 2 * w / (2 * w + math.sqrt(2 * math.pi) * s)
    flat = torch.rand(n, generator=generator) < p_flat
    band = (2 * torch.rand(n, generator=generator) - 1) * w
    g = torch.randn(n, generator=generator) * s
    tail = torch.sign(g) * (w + g.abs())
    return cfg.mean + torch.where(flat, band, tail)


def timestep_density(cfg: TimestepConfig, t: Tensor) -> Tensor:
    """Probability density of the (unshifted) distribution at t in (0, 1), for tests and plots."""
    if cfg.distribution == AUTO:
        raise ValueError("timestep distribution 'auto' has no density until it is resolved")
    if cfg.distribution == "uniform":
        return torch.ones_like(t)
    u = torch.logit(t.double())
    jac = 1.0 / (t.double() * (1 - t.double()))
    if cfg.distribution == "logit_normal":
        pdf = torch.exp(-0.5 * ((u - cfg.mean) / cfg.std) ** 2) / (cfg.std * math.sqrt(2 * math.pi))
    else:
        d = ((u - cfg.mean).abs() - cfg.plateau).clamp(min=0)
        pdf = torch.exp(-0.5 * (d / cfg.std) ** 2) / (2 * cfg.plateau + math.sqrt(2 * math.pi) * cfg.std)
    return (pdf * jac).to(t.dtype)
