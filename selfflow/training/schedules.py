"""Schedules of the run loop as pure functions of the optimizer step: learning rate and EMA decay.

Nothing here is checkpointed: a resumed run recomputes the value for its step, so the loss trace
of a resumed run equals the uninterrupted one bit for bit. `step` is the 0-based index of the
optimizer step about to be taken.

    lr = lr_at(LRConfig(peak=1e-4, warmup_steps=1000, decay="cosine", floor=1e-6), step, total_steps)
    decay = ema_decay(EMAConfig(decay=0.9999), step)
"""

import math
from dataclasses import dataclass

DECAYS = ("constant", "cosine", "linear")


@dataclass
class LRConfig:
    """Linear warm-up to `peak`, then constant, cosine or linear decay to `floor`.

    Defaults: SiT and REPA train with AdamW at a constant 1e-4 without warm-up or decay (their
    public `train.py`); the paper does not state its schedule, so the same is the default here.
    """

    peak: float = 1e-4
    warmup_steps: int = 0  # linear warm-up: step i (0-based) gets peak * (i + 1) / warmup_steps
    decay: str = "constant"  # "constant" | "cosine" | "linear" after the warm-up
    floor: float = 0.0  # learning rate at the end of the decay
    decay_steps: int = 0  # the decay ends at this step (0: at the run's last step); constant after it

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if not self.peak > 0 or self.floor < 0 or self.floor > self.peak:
            raise ValueError(f"need peak > 0 and 0 <= floor <= peak, got peak {self.peak}, floor {self.floor}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")


def lr_at(cfg: LRConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of a run of `total_steps` steps."""
    if step < cfg.warmup_steps:
        return cfg.peak * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.peak
    end = cfg.decay_steps or total_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, end - 1 - cfg.warmup_steps))
    if cfg.decay == "cosine":
        return cfg.floor + (cfg.peak - cfg.floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.peak + (cfg.floor - cfg.peak) * progress


@dataclass
class EMAConfig:
    """EMA teacher decay. 0.9999 is the paper's value (DESIGN.md section 2)."""

    decay: float = 0.9999
    warmup: bool = False  # decay_t = min(decay, (1 + t) / (10 + t)), as in the reference EMA warm-ups

    def __post_init__(self):
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")


def ema_decay(cfg: EMAConfig, step: int) -> float:
    """EMA decay after optimizer step `step` (0-based)."""
    return min(cfg.decay, (1 + step) / (10 + step)) if cfg.warmup else cfg.decay
