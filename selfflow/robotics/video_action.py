"""Video-action prediction on the shared trunk: one joint sequence of frames and an action chunk.

The sequence is `[context frames | future frames | action chunk]` (`MMDiT` with
`modality=("video", "action")`): the frames through the video input projection, the actions
(normalised with the dataset statistics, one token per step at 3 Hz) through their own, with
position ids `(step, 0, 0, 0)` on the frames' time axis. Timesteps are per token:

- observed (context) frames: `t = 0`, never noised, no loss;
- future frames and the action chunk: each part its own timestep, drawn independently, so one
  model learns to be a policy (frames unknown, t near 1, actions denoised), a forward model
  (actions given, frames denoised) or a joint generator (as in Unified World Models);
  `policy_fraction` of the samples get future frames at exactly `t = 1` (pure noise), the state
  the policy samples from.

With `objective.method = "selfflow"` each noised part gets Self-Flow's dual timesteps and token
mask, the EMA teacher sees each part at its cleaner timestep, and the student's projected block-`l`
features of the noised tokens are aligned to the teacher's block-`k` features (paper Eq. 4-5).

    terms = video_action_loss(objective, va_cfg, clip, student, teacher, generator)
    chunk = sample_action_chunk(model, clip, steps=10)      # (B, H, Ca), frames held at t = 1
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from selfflow.flow.paths import TimestepConfig, velocity_target
from selfflow.flow.samplers import euler
from selfflow.training.objective import LossTerms, ObjectiveConfig, noise_batch, representation_loss


@dataclass
class VideoActionConfig:
    frame_timesteps: TimestepConfig = field(default_factory=lambda: TimestepConfig("logit_normal"))
    action_timesteps: TimestepConfig = field(default_factory=lambda: TimestepConfig("logit_normal"))
    frame_mask_ratio: float = 0.10  # Self-Flow token mask of the future frames (the paper's video ratio)
    action_mask_ratio: float = 0.25
    policy_fraction: float = 0.25  # samples whose future frames are pure noise (t = 1)
    action_weight: float = 1.0  # weight of the action tokens' flow-matching loss

    def __post_init__(self):
        for name in ("frame_mask_ratio", "action_mask_ratio", "policy_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.action_weight < 0:
            raise ValueError(f"action_weight must be >= 0, got {self.action_weight}")


class Clip(NamedTuple):
    """One batch of clips as tokens; ids are `(B, L, 4)` per part."""

    context: Tensor  # (B, Lc, Cv) observed frame tokens
    future: Tensor  # (B, Lf, Cv) future frame tokens
    actions: Tensor  # (B, H, Ca) normalised action chunk, one token per step
    ids_context: Tensor
    ids_future: Tensor
    ids_actions: Tensor
    text: Tensor | None = None  # (B, L_txt) ids or (B, L_txt, D)
    text_mask: Tensor | None = None


def joint(clip: Clip, future: Tensor, actions: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Model inputs `((frames, actions), ids)` with the given (noised) future frames and actions."""
    frames = torch.cat((clip.context, future), dim=1)
    return (frames, actions), torch.cat((clip.ids_context, clip.ids_future, clip.ids_actions), dim=1)


def video_action_loss(
    objective: ObjectiveConfig, cfg: VideoActionConfig, clip: Clip, student, teacher, generator: torch.Generator
) -> LossTerms:
    """Flow matching on future frames and actions (+ Self-Flow's representation loss).

    `student(x, t, ids, layer)` returns `(v_frames, v_actions)` or, with a layer, also the projected
    features of all data tokens; `teacher(x, t, ids, layer)` returns block-`layer` hidden states.
    """
    fut = noise_batch(clip.future, cfg.frame_timesteps, cfg.frame_mask_ratio, objective, generator)
    act = noise_batch(clip.actions, cfg.action_timesteps, cfg.action_mask_ratio, objective, generator)
    policy = (torch.rand(len(clip.future), generator=generator) < cfg.policy_fraction).to(clip.future.device)
    fut_x = torch.where(policy[:, None, None], fut.noise, fut.x_student)  # policy mode: frames unknown
    fut_tau = torch.where(policy[:, None], torch.ones_like(fut.tau), fut.tau)
    x, ids = joint(clip, fut_x, act.x_student)
    zeros = torch.zeros(clip.context.shape[:2], device=fut.tau.device)
    tau = torch.cat((zeros, fut_tau, act.tau), dim=1)
    n_ctx = clip.context.shape[1]

    use_rep = objective.method == "selfflow" and objective.gamma > 0
    if use_rep:
        v_frames, v_actions, features = student(x, tau, ids, objective.student_layer)
    else:
        v_frames, v_actions = student(x, tau, ids, None)
    fm_frames = frame_loss(v_frames[:, n_ctx:], clip.future, fut.noise, ~policy)
    fm_actions = torch.nn.functional.mse_loss(v_actions.float(), velocity_target(clip.actions, act.noise).float())
    fm = fm_frames + cfg.action_weight * fm_actions
    if not use_rep:
        return LossTerms(fm, fm, fm.new_zeros(()))
    t_teacher_future = torch.where(policy, torch.ones_like(fut.tau_teacher), fut.tau_teacher)
    x_teacher, _ = joint(
        clip,
        torch.where(policy[:, None, None], fut.noise, fut.x_teacher),
        act.x_teacher,
    )
    tau_teacher = torch.cat(
        (
            zeros,
            t_teacher_future[:, None].expand_as(fut.tau),
            act.tau_teacher[:, None].expand_as(act.tau),
        ),
        dim=1,
    )
    with torch.no_grad():
        target = teacher(x_teacher, tau_teacher, ids, objective.teacher_layer)
    rep = representation_loss(features[:, n_ctx:], target[:, n_ctx:].detach(), objective.rep_loss)  # noised tokens
    return LossTerms(fm + objective.gamma * rep, fm, rep)


def frame_loss(v: Tensor, x0: Tensor, noise: Tensor, keep: Tensor) -> Tensor:
    """Flow-matching MSE of future frames over the samples in `keep` (policy-mode samples have
    pure-noise frames whose velocity target carries no information about the data they hide)."""
    per_sample = (v.float() - velocity_target(x0, noise).float()).pow(2).mean(dim=(1, 2))
    return (per_sample * keep).sum() / keep.sum().clamp(min=1)


@torch.no_grad()
def sample_action_chunk(model, clip: Clip, steps: int = 10, generator: torch.Generator | None = None) -> Tensor:
    """Policy mode: future frames held at pure noise (t = 1), the action chunk integrated from
    noise to data with Euler steps; returns the normalised chunk `(B, H, Ca)`."""
    device = clip.context.device
    gen = generator or torch.Generator().manual_seed(0)
    frames_noise = torch.randn(clip.future.shape, generator=gen).to(device)
    actions = torch.randn(clip.actions.shape, generator=gen).to(device)
    n_ctx, n_fut = clip.context.shape[1], clip.future.shape[1]
    cond = {} if clip.text is None else {"txt": clip.text, "txt_mask": clip.text_mask}

    def velocity(actions: Tensor, t: float) -> tuple[Tensor, Tensor]:
        x, ids = joint(clip, frames_noise, actions)
        B = len(actions)
        tau = torch.cat((torch.zeros(B, n_ctx), torch.ones(B, n_fut), torch.full((B, actions.shape[1]), t)), dim=1).to(
            device
        )
        _, v_actions = model(x, tau, ids, modality=("video", "action"), **cond)
        return actions, v_actions.float()

    # A float32 grid (not `ode_grid`'s float64 one), as the policy has always been sampled.
    return euler(velocity, actions, torch.linspace(1, 0, steps + 1).tolist())
