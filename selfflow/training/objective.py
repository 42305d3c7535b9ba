"""Training objectives: vanilla flow matching, REPA and Self-Flow (paper Eq. 4-5; DESIGN.md section 2).

Pure functions of tensors and two closures, so the same code drives the SiT and the MMDiT trunk:
the caller binds the conditioning (labels, text, ids) into `student(x, t, layer)` and
`teacher(x, t, layer)`. Self-Flow draws two timesteps `t, s` per sample and a token mask
`M ~ Bernoulli(R_M)`; the student sees token-wise `tau = where(M, s, t)`, the EMA teacher sees every
token at `min(t, s)`, and `loss = mse(v, noise - x0) + gamma * (-cosine(proj(h_l), teacher_k))`.

    cfg = ObjectiveConfig(method="selfflow", gamma=0.8, student_layer=8, teacher_layer=20)
    gen = torch.Generator().manual_seed(seed)                     # CPU generator, e.g. from (seed, step, rank)
    noised = noise_batch(x0, TimestepConfig(), mask_ratio=0.25, cfg=cfg, generator=gen)   # x0 (B, L, C) tokens
    keep = drop_condition(B, cfg.cond_dropout, gen).to(y.device)
    y = torch.where(keep, y, null_class)                          # teacher gets the same dropped condition

    def student(x, t, layer):
        return model(x, t, y) if layer is None else model.forward_with_features(x, t, y, layer=layer)

    def teacher(x, t, layer):
        return ema_model.hidden_states(x, t, y, layer=layer)

    terms = training_loss(cfg, x0, noised, student, teacher)     # LossTerms(total, fm, rep)
    terms.total.backward()

REPA (`method="repa"`) aligns the student's projected block-`l` features to a frozen external encoder
instead: `training_loss(cfg, x0, noised, student, target_features=target_features)`, with the targets
from `selfflow.eval.encoders.RepaEncoder` (`RepaEncoder(folder)(images, grid_hw)`).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from selfflow.flow.paths import TimestepConfig, interpolate, sample_timesteps, velocity_target

METHODS = ("selfflow", "fm", "repa")
REP_LOSSES = ("cosine", "l2")
SECOND_TIMESTEPS = ("independent", "slightly_cleaner")

# student(x, t, None) -> velocity; student(x, t, l) -> (velocity, projector(hidden after block l))
Student = Callable[[Tensor, Tensor, int | None], Tensor | tuple[Tensor, Tensor]]
# teacher(x, t, k) -> raw hidden state after block k
Teacher = Callable[[Tensor, Tensor, int], Tensor]


@dataclass
class ObjectiveConfig:
    """Which objective to train and its ablation switches (DESIGN.md section 2).

    `gamma = 0` with `method="selfflow"` is the "no representation loss" ablation: the student still
    sees dual-timestep inputs, and the teacher never runs.
    """

    method: str = "selfflow"  # "selfflow" | "fm" (vanilla flow matching) | "repa"
    gamma: float = 0.8  # weight of the representation loss
    student_layer: int = 8  # l: projector(student hidden after block l), 1-based
    teacher_layer: int = 20  # k: teacher raw hidden after block k (selfflow only)
    rep_loss: str = "cosine"  # "cosine" | "l2" (ablation)
    masking: bool = True  # False: student sees t on every token; teacher still at min(t, s)
    second_timestep: str = "independent"  # "independent" (paper) | "slightly_cleaner": s = clamp(t - delta, 0)
    cleaner_delta: float = 0.05
    cond_dropout: float = 0.1  # probability of dropping the condition (CFG training)
    repa_encoder: str | None = None  # REPA: local folder of a transformers vision model (e.g. DINOv2)
    repa_image_size: int = 0  # REPA: encoder input size; 0 = the encoder config's (REPA feeds DINOv2 224)

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("rep_loss", self.rep_loss, REP_LOSSES)
        _check_choice("second_timestep", self.second_timestep, SECOND_TIMESTEPS)
        if not self.gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        for name in ("student_layer", "teacher_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.masking, bool):
            raise ValueError(f"masking must be a bool, got {self.masking!r}")
        if not 0 <= self.cleaner_delta <= 1:
            raise ValueError(f"cleaner_delta must be in [0, 1], got {self.cleaner_delta}")
        if not 0 <= self.cond_dropout <= 1:
            raise ValueError(f"cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if self.repa_image_size < 0:
            raise ValueError(f"repa_image_size must be >= 0, got {self.repa_image_size}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class NoisedBatch(NamedTuple):
    noise: Tensor  # (B, L, C), shared by student and teacher
    t: Tensor  # (B,) first timestep
    s: Tensor  # (B,) second timestep (equals t for "fm" / "repa")
    mask: Tensor  # (B, L) bool, True = token at s
    tau: Tensor  # (B, L) student timesteps, where(mask, s, t)
    tau_teacher: Tensor  # (B,) min(t, s)
    x_student: Tensor  # (B, L, C) interpolate(x0, noise, tau)
    x_teacher: Tensor  # (B, L, C) interpolate(x0, noise, tau_teacher)


class LossTerms(NamedTuple):
    total: Tensor
    fm: Tensor
    rep: Tensor  # 0-d zero when the representation loss is off


def noise_batch(
    x0: Tensor, timesteps: TimestepConfig, mask_ratio: float, cfg: ObjectiveConfig, generator: torch.Generator
) -> NoisedBatch:
    """Noise, dual timesteps and token mask for clean tokens x0 `(B, L, C)` (paper Eq. 4).

    Draws happen on CPU from `generator` in a fixed order (noise, t, s, mask), so a batch is a function
    of the generator's state; draws that a method does not need are skipped. Samples come back in x0's
    device and dtype, timesteps in float32 on x0's device (low-precision timesteps would quantise t).
    """
    if x0.ndim != 3:
        raise ValueError(f"x0 must be (B, L, C) tokens, got {tuple(x0.shape)}")
    if not 0 <= mask_ratio <= 1:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    B, L, _ = x0.shape
    noise = torch.randn(x0.shape, generator=generator)
    t = sample_timesteps(timesteps, B, generator)
    if cfg.method != "selfflow":
        s = t  # one timestep: vanilla flow matching
    elif cfg.second_timestep == "independent":
        s = sample_timesteps(timesteps, B, generator)  # same distribution, shift included
    else:
        s = (t - cfg.cleaner_delta).clamp(min=0)
    if cfg.method == "selfflow" and cfg.masking:
        mask = torch.rand(B, L, generator=generator) < mask_ratio
    else:
        mask = torch.zeros(B, L, dtype=torch.bool)

    device = x0.device
    noise = noise.to(device=device, dtype=x0.dtype)
    t, s, mask = t.to(device), s.to(device), mask.to(device)
    tau = torch.where(mask, s[:, None], t[:, None])  # (B, L)
    tau_teacher = torch.minimum(t, s)  # (B,) the cleaner of the two views
    return NoisedBatch(
        noise=noise,
        t=t,
        s=s,
        mask=mask,
        tau=tau,
        tau_teacher=tau_teacher,
        x_student=interpolate(x0, noise, tau),
        x_teacher=interpolate(x0, noise, tau_teacher),
    )


def flow_matching_loss(v_pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Mean squared error of the predicted velocity against `noise - x0`, over tokens and channels."""
    return F.mse_loss(v_pred.float(), velocity_target(x0, noise).float())


def representation_loss(pred: Tensor, target: Tensor, kind: str = "cosine") -> Tensor:
    """Feature alignment loss in float32, averaged over tokens (paper Eq. 5).

    `cosine`: `-cos(pred, target)` per token. `l2` (ablation): squared L2 distance per token.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} features differ in shape")
    pred, target = pred.float(), target.float()
    if kind == "cosine":
        return -F.cosine_similarity(pred, target, dim=-1).mean()
    if kind == "l2":
        return (pred - target).pow(2).sum(dim=-1).mean()
    raise ValueError(f"kind must be one of {REP_LOSSES}, got {kind!r}")


def drop_condition(batch_size: int, p: float, generator: torch.Generator) -> Tensor:
    """Bool keep-mask `(B,)` on CPU, False with probability p. Callers substitute the null condition."""
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return torch.rand(batch_size, generator=generator) >= p


def training_loss(
    cfg: ObjectiveConfig,
    x0: Tensor,
    noised: NoisedBatch,
    student: Student,
    teacher: Teacher | None = None,
    target_features: Tensor | None = None,
) -> LossTerms:
    """`fm + gamma * rep` for one batch; the student runs once, the teacher (if any) once without grad."""
    if cfg.method == "fm" or cfg.gamma == 0:
        v = student(noised.x_student, noised.tau, None)
        fm = flow_matching_loss(v, x0, noised.noise)
        return LossTerms(fm, fm, fm.new_zeros(()))

    if cfg.method == "selfflow":
        if teacher is None:
            raise ValueError("method 'selfflow' with gamma > 0 needs a teacher")
        with torch.no_grad():
            target = teacher(noised.x_teacher, noised.tau_teacher, cfg.teacher_layer)
    else:  # repa
        if target_features is None:
            raise ValueError("method 'repa' needs target_features from the external encoder")
        target = target_features

    v, features = student(noised.x_student, noised.tau, cfg.student_layer)
    fm = flow_matching_loss(v, x0, noised.noise)
    rep = representation_loss(features, target.detach(), cfg.rep_loss)
    return LossTerms(fm + cfg.gamma * rep, fm, rep)
