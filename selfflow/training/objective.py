"""Training objectives: vanilla flow matching, REPA and Self-Flow (paper Eq. 4-5; DESIGN.md section 2).

Pure functions of tensors and two closures, so the same code drives the SiT and the MMDiT trunk:
the caller binds the conditioning (labels, text, ids) into `student(x, t, layer)` and
`teacher(x, t, layer)`. Self-Flow draws two timesteps `t, s` per sample and a token mask
`M ~ Bernoulli(R_M)`; the student sees token-wise `tau = where(M, s, t)`, given to it as
`TwoTimesteps(t, s, M)` (the trunks take it directly and build their conditioning rows from the two
values without a host sync; `.dense()` is the `(B, L)` tensor), the EMA teacher sees every token at
`min(t, s)`, and `loss = mse(v, noise - x0) + gamma * (-cosine(proj(h_l), teacher_k))`.

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
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from selfflow.backbone.layers import TwoTimesteps
from selfflow.flow.paths import TimestepConfig, interpolate, sample_timesteps, velocity_target

METHODS = ("selfflow", "fm", "repa")
REP_LOSSES = ("cosine", "l2")
SECOND_TIMESTEPS = ("independent", "slightly_cleaner", "none")
CLEANER_GAPS = ("fixed", "uniform")

# student(x, TwoTimesteps, None) -> velocity; student(x, TwoTimesteps, l) -> (velocity, projector(hidden after l))
Student = Callable[[Tensor, TwoTimesteps, int | None], Tensor | tuple[Tensor, Tensor]]
# teacher(x, t, k) -> raw hidden state after block k
Teacher = Callable[[Tensor, Tensor, int], Tensor]


@dataclass
class ObjectiveConfig:
    """Which objective to train and its ablation switches (DESIGN.md section 2), each with its source.

    Methods: `selfflow` (paper Eq. 4-5), `fm` (vanilla flow matching: one timestep per sample, no mask,
    no representation loss), `repa` (REPA, sihyun-yu/REPA `loss.py` / `train.py`: one timestep per sample,
    the student's projected block-`l` tokens aligned by `-cosine` to a frozen encoder's patch tokens of
    the decoded clean sample, `loss = fm + repa_coeff * rep`).

    Ablations the paper reports (section 5.4), as defined here:
    - no representation loss: `gamma=0` with `method=selfflow`. The student still sees dual-timestep
      inputs (and the mask); the teacher never runs.
    - no masking: `masking=false`. Every token of the student is at `t`; the teacher still sees the
      cleaner `min(t, s)` (the paper does not say which; this keeps its teacher input unchanged).
    - no dual-timestep scheduling at all: `second_timestep=none`. `s = t`: no mask, student and teacher
      both at `t` (the teacher differs only by its EMA weights and its deeper block).
    - slightly cleaner second timestep: `second_timestep=slightly_cleaner`, `s = max(t - gap, 0)` with the
      gap `cleaner_delta` (`cleaner_gap=fixed`) or drawn from `U(0, cleaner_delta)` per sample
      (`cleaner_gap=uniform`); masked tokens then sit at `s`, the teacher at `s`. The paper gives no gap:
      0.05 fixed is this project's choice (unknown, chosen as "slightly" = 5% of the noise range).
    - L2 instead of cosine: `rep_loss=l2`, the squared error per token averaged over tokens and channels
      (a per-token mean, so it is on the scale of the flow-matching MSE).

    Not in the paper, an option of any method: `contrastive_weight` (lambda) adds Contrastive Flow
    Matching (Stoica et al. 2025, arXiv 2506.05350, "Delta-FM"), `- lambda * mse(v, noise' - x0')`, the
    velocity pushed away from another item's target. The reference (gstoica27/DeltaFM, `--loss-type
    contrastive`) takes the other item from a shuffle of the batch; here it is the batch rolled by one,
    so no item is its own negative.
    """

    method: str = "selfflow"  # "selfflow" | "fm" (vanilla flow matching) | "repa"
    gamma: float = 0.8  # Self-Flow: weight of the representation loss (paper section 3)
    repa_coeff: float = 0.5  # REPA: weight of its alignment loss (REPA train.py --proj-coeff 0.5)
    # l, k (1-based): SiT-XL/2 student block 8, teacher block 20 (public release README; REPA's
    # --encoder-depth 8). null: the same relative depths (8/28, 20/28) of the model, set by `selfflow train`.
    student_layer: int | None = 8
    teacher_layer: int | None = 20  # selfflow only
    rep_loss: str = "cosine"  # "cosine" (paper, REPA) | "l2" (ablation, per-token mean)
    masking: bool = True  # False: student at t on every token, teacher still at min(t, s) (ablation)
    second_timestep: str = "independent"  # "independent" (paper) | "slightly_cleaner" | "none" (ablations)
    cleaner_delta: float = 0.05  # slightly_cleaner: the gap (or its upper end); unknown, see above
    cleaner_gap: str = "fixed"  # slightly_cleaner: "fixed" gap delta | "uniform" gap ~ U(0, delta)
    # Delta-FM's lambda; 0 = off (the paper and its baselines). The reference's value is 0.05
    # (gstoica27/DeltaFM README, --contrastive-weight); below 1 the loss stays bounded below.
    contrastive_weight: float = 0.0
    cond_dropout: float = 0.1  # condition dropout for CFG (REPA / SiT --cfg-prob 0.1; the paper does not say)
    repa_encoder: str | None = None  # REPA: local folder of a transformers vision model (e.g. DINOv2-B)
    # REPA: encoder input size; 0 = REPA's for the encoder (224 for DINOv2: REPA train.py
    # preprocess_raw_image resizes bicubically to 224), else the encoder config's image_size
    repa_image_size: int = 0
    # REPA: modalities trained with plain flow matching because REPA has no encoder for them (explicit;
    # a modality REPA cannot serve and not listed here is a config error). Audio always needs listing.
    repa_skip: list[str] = field(default_factory=list)

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_choice("rep_loss", self.rep_loss, REP_LOSSES)
        _check_choice("second_timestep", self.second_timestep, SECOND_TIMESTEPS)
        _check_choice("cleaner_gap", self.cleaner_gap, CLEANER_GAPS)
        for name in ("gamma", "repa_coeff"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("student_layer", "teacher_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or null: from the model's depth), got {value!r}")
        if not isinstance(self.masking, bool):
            raise ValueError(f"masking must be a bool, got {self.masking!r}")
        if not 0 <= self.cleaner_delta <= 1:
            raise ValueError(f"cleaner_delta must be in [0, 1], got {self.cleaner_delta}")
        if not 0 <= self.contrastive_weight < 1:
            raise ValueError(f"contrastive_weight must be in [0, 1) (unbounded from 1), got {self.contrastive_weight}")
        if not 0 <= self.cond_dropout <= 1:
            raise ValueError(f"cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if self.repa_image_size < 0:
            raise ValueError(f"repa_image_size must be >= 0, got {self.repa_image_size}")
        if not isinstance(self.repa_skip, list) or not all(isinstance(m, str) for m in self.repa_skip):
            raise ValueError(f"repa_skip must be a list of modality names, got {self.repa_skip!r}")

    @property
    def rep_weight(self) -> float:
        """The weight of this method's representation loss (0 for flow matching)."""
        return {"selfflow": self.gamma, "repa": self.repa_coeff, "fm": 0.0}[self.method]

    @property
    def dual_timestep(self) -> bool:
        """Whether the student sees two timesteps (Self-Flow's schedule, possibly ablated)."""
        return self.method == "selfflow" and self.second_timestep != "none"


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

    @property
    def student_t(self) -> TwoTimesteps:
        """`tau` as the student is given it: each sample's two timesteps and the mask."""
        return TwoTimesteps(self.t, self.s, self.mask)


class LossTerms(NamedTuple):
    total: Tensor
    fm: Tensor  # the plain flow-matching MSE (without Delta-FM's negative term)
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
    if not cfg.dual_timestep:
        s = t  # one timestep: flow matching, REPA, or Self-Flow without dual-timestep scheduling
    elif cfg.second_timestep == "independent":
        s = sample_timesteps(timesteps, B, generator)  # same distribution, shift included
    else:  # slightly_cleaner
        gap = torch.full((B,), cfg.cleaner_delta)
        if cfg.cleaner_gap == "uniform":
            gap = gap * torch.rand(B, generator=generator)
        s = (t - gap).clamp(min=0)
    if cfg.dual_timestep and cfg.masking:
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


def contrastive_term(v_pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Delta-FM's negative: the MSE of each item's velocity against the next item's target (batch rolled by one)."""
    if len(x0) < 2:
        raise ValueError(f"objective.contrastive_weight > 0 needs at least 2 items a batch (negatives), got {len(x0)}")
    return F.mse_loss(v_pred.float(), velocity_target(x0, noise).float().roll(1, dims=0))


def representation_loss(pred: Tensor, target: Tensor, kind: str = "cosine") -> Tensor:
    """Feature alignment loss in float32, averaged over tokens (paper Eq. 5; REPA `loss.py`).

    `cosine`: `-cos(pred, target)` per token. `l2` (ablation): the squared error averaged over tokens and
    channels (a per-token mean, on the scale of the flow-matching MSE rather than `D` times it).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} features differ in shape")
    pred, target = pred.float(), target.float()
    if kind == "cosine":
        return -F.cosine_similarity(pred, target, dim=-1).mean()
    if kind == "l2":
        return (pred - target).pow(2).mean()
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
    """`fm + gamma * rep` (`- contrastive_weight * negative` with Delta-FM) for one batch; the student runs
    once, the teacher (if any) once without grad."""
    tau = noised.student_t
    if cfg.student_layer is None or (cfg.method == "selfflow" and cfg.teacher_layer is None):
        raise ValueError("objective layers are null: resolve them from the model's depth first")

    def fm_and_negative(v: Tensor) -> tuple[Tensor, Tensor]:
        fm = flow_matching_loss(v, x0, noised.noise)
        if cfg.contrastive_weight == 0:
            return fm, fm
        return fm, fm - cfg.contrastive_weight * contrastive_term(v, x0, noised.noise)

    if cfg.rep_weight == 0:
        fm, flow = fm_and_negative(student(noised.x_student, tau, None))
        return LossTerms(flow, fm, fm.new_zeros(()))

    if cfg.method == "selfflow":
        if teacher is None:
            raise ValueError("method 'selfflow' with gamma > 0 needs a teacher")
        with torch.no_grad():
            target = teacher(noised.x_teacher, noised.tau_teacher, cfg.teacher_layer)
    else:  # repa
        if target_features is None:
            raise ValueError("method 'repa' needs target_features from the external encoder")
        target = target_features

    v, features = student(noised.x_student, tau, cfg.student_layer)
    fm, flow = fm_and_negative(v)
    rep = representation_loss(features, target.detach(), cfg.rep_loss)
    return LossTerms(flow + cfg.rep_weight * rep, fm, rep)
