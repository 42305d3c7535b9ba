"""Pretraining: Self-Flow (or flow matching / REPA) on the shared MMDiT trunk, as a task of the run loop.

Each optimizer step draws one modality (a function of `(seed, step)`, so every rank agrees; with
`deepspeed.grad_accum > 1` every micro-batch of the step comes from that modality, as the paper
draws one modality per step) and trains on that modality's micro-batches; noise, timesteps,
masks and condition dropout come from the loop's generator seeded by `(seed, step, micro, rank)`.
The loop itself (checkpoints, resume, the finiteness check, MLflow) is `run.py`.

    selfflow train --config configs/train/tiny.yaml                    # one process
    torchrun --nproc-per-node 8 -m selfflow.cli train --config ...     # one node, 8 GPUs
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from selfflow.backbone.mmdit import MMDiT, MMDiTConfig, build_mmdit
from selfflow.data.batch import LatentBatch, mix_seed
from selfflow.data.loader import LatentStream, LoaderConfig, shard_list
from selfflow.data.synthetic import SyntheticConfig, SyntheticLatents, SyntheticStream
from selfflow.flow.paths import TimestepConfig
from selfflow.modalities.grid import unpatchify
from selfflow.training.objective import ObjectiveConfig, drop_condition, noise_batch, training_loss
from selfflow.training.run import Models, Periodic, RunConfig, StepOutput, run

# REPA's frozen encoder (given by the job): images (B, 3, H, W) in [-1, 1], the token grid (h, w) and the
# device of the loss -> target features (B, h*w, d) on that device.
RepaTarget = Callable[[Tensor, tuple[int, int], torch.device], Tensor]


@dataclass
class MixConfig:
    """One modality's share of training and its noising defaults (paper section 4)."""

    probability: float = 1.0
    batch_size: int = 8  # per process
    mask_ratio: float = 0.25
    timesteps: TimestepConfig = field(default_factory=lambda: TimestepConfig("logit_normal"))
    shards: str | None = None  # latent shards from `selfflow prepare`; None: the in-memory synthetic latents
    data: SyntheticConfig = field(default_factory=SyntheticConfig)  # used when shards is None
    max_bad_samples: int = 100  # consecutive corrupt samples after which the loader stops with an error

    def __post_init__(self):
        if not 0 <= self.probability <= 1 or self.batch_size < 1 or not 0 <= self.mask_ratio <= 1:
            raise ValueError("probability and mask_ratio must be in [0, 1] and batch_size >= 1")
        if self.max_bad_samples < 1:
            raise ValueError(f"max_bad_samples must be >= 1, got {self.max_bad_samples}")


def default_mix() -> dict[str, MixConfig]:
    """Paper defaults: image 57% x 38, video 30% x 8, audio 13% x 16; mask ratios 0.25 / 0.10 / 0.50.

    Train shifts: audio 0.75 (public samples' names); image and video shifts are unknown (1.0).
    Token grids as the paper's latents: FLUX.2 AE 256 px (16x16 x 128 ch), Wan2.2 45 frames at
    192x320 (12x12x20 x 48 ch), SongBloom 10 s (250 x 64 ch).
    """
    return {
        "image": MixConfig(0.57, 38, 0.25, TimestepConfig("logit_normal"), data=SyntheticConfig([1, 16, 16], 128)),
        "video": MixConfig(0.30, 8, 0.10, TimestepConfig("logit_normal"), data=SyntheticConfig([12, 12, 20], 48)),
        "audio": MixConfig(
            0.13, 16, 0.50, TimestepConfig("logit_normal", shift=0.75), data=SyntheticConfig([250, 1, 1], 64)
        ),
    }


def default_model() -> MMDiTConfig:
    """The paper's 625M trunk with image, video and audio projections."""
    return MMDiTConfig(projector_dim=1152, modalities={"image": [128, 128], "video": [48, 48], "audio": [64, 64]})


@dataclass
class TrainConfig(RunConfig):
    model: MMDiTConfig = field(default_factory=default_model)
    # Paper's layers for the 21-block MMDiT are unknown: SiT-XL's relative depths (8/28, 20/28) -> 6, 15.
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(student_layer=6, teacher_layer=15))
    modalities: dict[str, MixConfig] = field(default_factory=default_mix)

    def __post_init__(self):
        super().__post_init__()
        total = sum(m.probability for m in self.modalities.values())
        if not self.modalities or abs(total - 1) > 1e-6:
            raise ValueError(f"modalities' probabilities must sum to 1, got {total}")
        for name, mix in self.modalities.items():
            dims = self.model.modalities.get(name)
            if mix.shards is None and dims != [mix.data.channels] * 2:
                raise ValueError(
                    f"model.modalities.{name} must be [{mix.data.channels}, {mix.data.channels}], got {dims}"
                )
        check_objective(self.objective, self.model)


def check_objective(objective: ObjectiveConfig, model: MMDiTConfig) -> None:
    """What the objective needs from the model, checked with the config (not at the first step)."""
    uses_projector = objective.method != "fm" and objective.gamma > 0
    if uses_projector and not model.projector_dim:
        raise ValueError(f"objective {objective.method} needs model.projector_dim > 0 (the projector's width)")
    if uses_projector and objective.method == "selfflow" and model.projector_dim != model.hidden_size:
        raise ValueError(
            f"Self-Flow aligns the projector's output to the teacher's hidden state: model.projector_dim must "
            f"equal model.hidden_size {model.hidden_size}, got {model.projector_dim}"
        )
    if max(objective.student_layer, objective.teacher_layer) > model.depth:
        raise ValueError(f"objective layers must be <= model depth {model.depth}")
    if objective.method == "repa" and not objective.repa_encoder:
        raise ValueError("objective.method repa needs objective.repa_encoder (a local encoder folder)")


def draw_modality(cfg: TrainConfig, step: int) -> str:
    """The modality of optimizer step `step` (all its micro-batches): the same on every rank."""
    u = np.random.default_rng(mix_seed(cfg.seed, step, 104729)).random()
    cumulative = 0.0
    for name, mix in cfg.modalities.items():
        cumulative += mix.probability
        if u < cumulative:
            return name
    return name


class PretrainTask:
    """Model, one batch stream per modality, and the Self-Flow / FM / REPA loss of a micro-batch."""

    def __init__(self, cfg: TrainConfig, repa: RepaTarget | None = None):
        self.cfg, self.repa = cfg, repa
        if cfg.objective.method == "repa" and repa is None:
            raise ValueError("objective.method repa needs the encoder's target function")
        for mix in cfg.modalities.values():  # inputs are checked before anything starts
            if mix.shards:
                shard_list(mix.shards)
        self.micro_batch = max(m.batch_size for m in cfg.modalities.values())
        self.streams: dict = {}

    def build_model(self) -> MMDiT:
        return build_mmdit(self.cfg.model)

    def open_data(self, rank: int, positions: dict[str, int]) -> None:
        """One endless batch stream per modality, fast-forwarded to the checkpoint's positions."""
        cfg = self.cfg
        for name, mix in cfg.modalities.items():
            position = positions.get(name, 0)
            if mix.shards:
                loader = LoaderConfig(mix.shards, max_bad_samples=mix.max_bad_samples)
                self.streams[name] = LatentStream(loader, mix.batch_size, cfg.seed, rank, position)
            else:
                data = SyntheticLatents(name, mix.data, cfg.seed)
                self.streams[name] = SyntheticStream(data, mix.batch_size, rank, position)

    def positions(self) -> dict[str, int]:
        return {name: stream.position for name, stream in self.streams.items()}

    def loss(self, models: Models, step: int, micro: int, generator: torch.Generator) -> StepOutput:
        """Condition dropout, dual-timestep noising, student and teacher passes for one micro-batch."""
        cfg, device = self.cfg, models.device
        modality = draw_modality(cfg, step)
        batch = next(self.streams[modality])
        objective, target = cfg.objective, None
        if objective.method == "repa":  # REPA's encoder sees images; other modalities train plain flow matching
            if modality == "image":
                grid = (int(batch.ids[0, :, 1].max()) + 1, int(batch.ids[0, :, 2].max()) + 1)
                target = self.repa(pixels(batch), grid, device)
            else:
                objective = replace(objective, method="fm")
        x0, ids = batch.x0.to(device), batch.ids.to(device)
        # Condition dropout for CFG: null class and no text; the teacher gets the same condition.
        keep = drop_condition(len(x0), cfg.objective.cond_dropout, generator)
        y = txt = txt_mask = None
        if cfg.model.num_classes:
            y = torch.where(keep & (batch.labels >= 0), batch.labels, cfg.model.num_classes - 1).to(device)
        if batch.text is not None and cfg.model.context_dim:
            txt = batch.text.to(device)
            txt_mask = (batch.text_mask & keep[:, None]).to(device)
        mix = cfg.modalities[modality]
        noised = noise_batch(x0, mix.timesteps, mix.mask_ratio, objective, generator)
        cond = {"txt": txt, "txt_mask": txt_mask, "y": y, "modality": modality}

        def student(x, t, layer):
            x = x.to(models.dtype)
            if layer is None:
                return models.student(x, t, ids, **cond).float()
            out = models.student.forward_with_features(x, t, ids, layer=layer, **cond)
            return out.velocity.float(), out.features.float()

        def teacher(x, t, layer):
            with models.teacher() as model:
                return model.hidden_states(x, t, ids, layer=layer, **cond).float()

        terms = training_loss(objective, x0, noised, student, teacher, target_features=target)
        return StepOutput(terms, modality, len(x0), x0.shape[0] * x0.shape[1])


def pixels(batch: LatentBatch) -> torch.Tensor:
    """Images `(B, 3, H, W)` from raw-pixel image tokens (`3 * p * p` channels per token)."""
    channels = batch.x0.shape[-1]
    patch = math.isqrt(channels // 3)
    if 3 * patch * patch != channels:
        raise ValueError(f"REPA needs raw-pixel image tokens (3 * p * p channels), got {channels} channels")
    h, w = int(batch.ids[0, :, 1].max()) + 1, int(batch.ids[0, :, 2].max()) + 1
    return unpatchify(batch.x0, batch.ids, patch, 3, h, w)


def train(cfg: TrainConfig, repa: RepaTarget | None = None, callbacks: Sequence[Periodic] = ()) -> Path:
    """Train to `cfg.steps` optimizer steps; returns the run folder. Inputs are checked before anything starts."""
    return run(cfg, PretrainTask(cfg, repa), callbacks)
