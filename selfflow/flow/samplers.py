"""Samplers: Euler and Heun ODE, the public release's Euler-Maruyama SDE, classifier-free guidance.

All samplers work on token tensors `x` `(B, L, C)` and integrate from noise (`t = 1`) to data
(`t = 0`) with a velocity function `v = velocity(x, t)`, `t` of shape `(B,)`. The ODE loops
(`euler`, `heun`) take any `(x, t) -> (x, v)` step function and a grid of noise levels, so other
callers (the robot policy's action chunk, `selfflow.robotics.video_action`) integrate with them too.

Guidance follows the public release exactly: the state is the doubled batch `[uncond; cond]`;
at a step whose noise level lies in `cfg_interval`, the uncond half is first overwritten by
the cond half and both halves move with `v_u + w * (v_c - v_u)`; at other steps the halves
move separately. The result is the cond half.

    cfg = SamplerConfig(kind="sde", num_steps=250)
    x0 = sample(lambda x, t, y: model(x, t, y), noise, labels, null_label=1000, cfg=cfg,
                noise_source=PerSampleNoise(seeds))
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from selfflow.flow.paths import shift_timesteps

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t (B,), labels (B,)) -> velocity
# (x, t) -> (x, v): the state (`Guided` may replace its uncond half) and its velocity at noise level t
StepFn = Callable[[Tensor, float], tuple[Tensor, Tensor]]
SAMPLERS = ("euler", "heun", "sde")


@dataclass
class SamplerConfig:
    kind: str = "sde"  # "euler" | "heun" (ODE) | "sde" (Euler-Maruyama, public release)
    num_steps: int = 250
    sample_shift: float = 1.0  # timestep shift of the ODE grid
    last_step: float = 0.04  # SDE: size of the final noise-free "Mean" step
    cfg_scale: float = 1.0  # 1.0 = no guidance
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # noise levels where CFG applies

    def __post_init__(self):
        if self.kind not in SAMPLERS:
            raise ValueError(f"kind must be one of {SAMPLERS}, got {self.kind!r}")
        if self.num_steps < (2 if self.kind == "sde" else 1):
            raise ValueError(f"num_steps is too small for {self.kind}: {self.num_steps}")
        if self.sample_shift <= 0:
            raise ValueError(f"sample_shift must be positive, got {self.sample_shift}")
        if self.kind == "sde" and self.sample_shift != 1.0:
            raise ValueError("sample_shift is not supported by the sde sampler (the public grid is unshifted)")
        if not 0 < self.last_step < 1:
            raise ValueError(f"last_step must be in (0, 1), got {self.last_step}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        lo, hi = self.cfg_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")


class GlobalNoise:
    """`torch.randn(shape)` from the global generator: the public release's draw order."""

    def __call__(self, shape: torch.Size, like: Tensor) -> Tensor:
        return torch.randn(shape).to(like)


class PerSampleNoise:
    """One generator per batch row, so each sample's draws depend only on its own seed.

    With it a sample's result does not depend on batch size or on the number of processes.
    """

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, shape: torch.Size, like: Tensor) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} rows requested from {len(self.generators)} generators")
        rows = [torch.randn(shape[1:], generator=g) for g in self.generators]
        return torch.stack(rows).to(like)

    def doubled(self) -> "PerSampleNoise":
        """Generators for the guidance batch `[uncond; cond]`; the cond half keeps the original streams."""
        other = PerSampleNoise([])
        # torch's CPU generator uses only the low 32 bits of a seed: offset within them.
        uncond = [torch.Generator().manual_seed((g.initial_seed() + 0x7FFFFFFF) % 2**32) for g in self.generators]
        other.generators = uncond + self.generators
        return other


NoiseSource = GlobalNoise | PerSampleNoise


class Guided:
    """Velocity of the (possibly doubled) sampling state; see the module docstring."""

    def __init__(self, model_fn: ModelFn, labels: Tensor, null_label: int | None, cfg: SamplerConfig):
        self.model_fn, self.cfg = model_fn, cfg
        self.active = cfg.cfg_scale != 1.0
        if self.active:
            if null_label is None:
                raise ValueError("cfg_scale != 1 needs a null label")
            labels = torch.cat([torch.full_like(labels, null_label), labels])
        self.labels = labels

    def start(self, noise: Tensor) -> Tensor:
        return torch.cat([noise, noise]) if self.active else noise

    def result(self, x: Tensor) -> Tensor:
        return x.chunk(2)[1] if self.active else x

    def __call__(self, x: Tensor, t: float) -> tuple[Tensor, Tensor]:
        """Returns the state (uncond half replaced where guidance applies) and its velocity."""
        t_vec = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        lo, hi = self.cfg.cfg_interval
        if not (self.active and lo <= t <= hi):
            return x, self.model_fn(x, t_vec, self.labels)
        x_cond = x.chunk(2)[1]
        x = torch.cat([x_cond, x_cond])
        v_u, v_c = self.model_fn(x, t_vec, self.labels).chunk(2)
        v = v_u + self.cfg.cfg_scale * (v_c - v_u)
        return x, torch.cat([v, v])


def ode_grid(num_steps: int, shift: float) -> list[float]:
    """Noise levels from 1 to 0 in `num_steps` steps, shifted."""
    return shift_timesteps(torch.linspace(1, 0, num_steps + 1, dtype=torch.float64), shift).tolist()


def euler(velocity: StepFn, x: Tensor, grid: list[float]) -> Tensor:
    """Euler steps from `grid[0]` to `grid[-1]` (noise levels, 1 down to 0)."""
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        x, v = velocity(x, t)
        x = x + (t_next - t) * v
    return x


def heun(velocity: StepFn, x: Tensor, grid: list[float]) -> Tensor:
    """Heun's second-order method (two velocity evaluations per step, t = 0 included: the
    velocity parameterisation stays finite there, unlike EDM's denoiser-derived slope)."""
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        x, v = velocity(x, t)
        _, v_next = velocity(x + (t_next - t) * v, t_next)
        x = x + (t_next - t) * 0.5 * (v + v_next)
    return x


def sde(velocity: Guided, x: Tensor, cfg: SamplerConfig, noise: NoiseSource) -> Tensor:
    """Euler-Maruyama with diffusion `g = 1 - s` in the data-time axis `s = 1 - t` (public release).

    With `u = -v` the velocity in that axis, `score = (s u - x) / (1 - s)` and
    `drift = u + g * score`; `x <- x + drift ds + sqrt(2 g ds) eps` on `linspace(0, 1 - last,
    num_steps)`, then one noise-free "Mean" step of size `last_step`.
    """
    s_grid = torch.linspace(0, 1 - cfg.last_step, cfg.num_steps)

    def drift(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        x, v = velocity(x, float(1 - s))
        u = -v
        score = (s * u - x) / (1 - s)
        return x, u + (1 - s) * score

    for s, s_next in zip(s_grid[:-1], s_grid[1:], strict=True):
        ds = s_next - s
        eps = noise(x.shape, x)
        x, d = drift(x, s)
        x = x + d * ds + torch.sqrt(2 * (1 - s)) * torch.sqrt(ds) * eps
    x, d = drift(x, s_grid[-1])
    return x + d * cfg.last_step


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    noise: Tensor,
    labels: Tensor,
    cfg: SamplerConfig,
    null_label: int | None = None,
    noise_source: NoiseSource | None = None,
) -> Tensor:
    """Integrate from `noise` (`t = 1`) to data with the sampler `cfg.kind`; returns `(B, L, C)`."""
    velocity = Guided(model_fn, labels, null_label, cfg)
    x = velocity.start(noise)
    if cfg.kind == "euler":
        x = euler(velocity, x, ode_grid(cfg.num_steps, cfg.sample_shift))
    elif cfg.kind == "heun":
        x = heun(velocity, x, ode_grid(cfg.num_steps, cfg.sample_shift))
    else:
        source = noise_source or GlobalNoise()
        if velocity.active and isinstance(source, PerSampleNoise):
            source = source.doubled()
        x = sde(velocity, x, cfg, source)
    return velocity.result(x)
