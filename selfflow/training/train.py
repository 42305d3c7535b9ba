"""Pretraining: Self-Flow (or flow matching / REPA) on the MMDiT or the SiT trunk, as a task of the run loop.

Each optimizer step draws one modality (a function of `(seed, step)`, so every rank agrees; with
`deepspeed.grad_accum > 1` every micro-batch of the step comes from that modality, as the paper
draws one modality per step) and trains on that modality's micro-batches; noise, timesteps,
masks and condition dropout come from the loop's generator seeded by `(seed, step, micro, rank)`.
The loop itself (checkpoints, resume, the finiteness check, MLflow) is `run.py`.

`model.kind` picks the trunk: `mmdit` (FLUX.2-style, any modality, text or classes) or `sit` (the
class-conditional SiT/DiT of the public ImageNet release, image latents only). `init=FILE` starts from
weights (a `selfflow export`, a run's `ema.safetensors`, or the public `selfflow_imagenet256.pt`), read
by the weights-only unpickler before anything starts.

    selfflow train --config configs/train/tiny.yaml                    # one process
    selfflow train --config configs/train/sit_tiny.yaml                # the SiT trunk
    torchrun --nproc-per-node 8 -m selfflow.cli train --config ...     # one node, 8 GPUs
"""

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfflow.backbone.checkpoint import extract_state_dict, load_weights, read_checkpoint
from selfflow.backbone.mmdit import MMDiTConfig
from selfflow.backbone.sit import SiTConfig
from selfflow.backbone.trunk import build_trunk
from selfflow.data.batch import mix_seed
from selfflow.data.loader import SPLITS, LatentStream, LoaderConfig, prepared_modality, read_manifest, shard_list
from selfflow.data.prefetch import ReadAhead
from selfflow.data.synthetic import SyntheticConfig, SyntheticLatents, SyntheticStream
from selfflow.flow.paths import AUTO, TimestepConfig
from selfflow.modalities.builder import build_modality, timestep_distribution
from selfflow.training.latent_space import (
    REPA_MODALITIES,
    RepaTarget,
    raw_modality,
    repa_targets,
)
from selfflow.training.objective import ObjectiveConfig, drop_condition, noise_batch, training_loss
from selfflow.training.run import Models, Periodic, RunConfig, StepOutput, run

__all__ = ["RepaTarget", "TrainConfig", "PretrainTask", "train"]

# The release's layers for SiT-XL/2 (28 blocks): student block 8, teacher block 20 (README of
# black-forest-labs/Self-Flow). Other depths (the 21-block MMDiT: unknown in the paper) keep these
# relative depths: round(8/28 * depth), round(20/28 * depth) -> 6, 15 for 21 blocks.
STUDENT_DEPTH, TEACHER_DEPTH = 8 / 28, 20 / 28


@dataclass
class MixConfig:
    """One modality's share of training and its noising defaults (paper section 4)."""

    probability: float = 1.0
    batch_size: int = 8  # per process
    mask_ratio: float = 0.25
    # "auto" distribution: the autoencoder's (paper 4.3: uniform for SD-VAE latents, logit-normal for
    # FLUX.2 AE / Wan2.2 / SongBloom latents; raw media and synthetic latents: logit-normal), resolved
    # from the data's manifest.json when the job starts and saved resolved in the run's config.yaml.
    timesteps: TimestepConfig = field(default_factory=lambda: TimestepConfig(AUTO))
    shards: str | None = None  # latent shards from `selfflow prepare`; None: the in-memory synthetic latents
    data: SyntheticConfig = field(default_factory=SyntheticConfig)  # used when shards is None
    max_bad_samples: int = 100  # consecutive corrupt samples after which the loader stops with an error
    # shards between ranks: "strict" (each epoch a seeded permutation dealt out, no shard read twice),
    # "resample" (draws with replacement, for fewer shards than ranks) or "auto" (strict when there are
    # at least as many shards as ranks)
    shard_split: str = "auto"

    def __post_init__(self):
        if not 0 <= self.probability <= 1 or self.batch_size < 1 or not 0 <= self.mask_ratio <= 1:
            raise ValueError("probability and mask_ratio must be in [0, 1] and batch_size >= 1")
        if self.max_bad_samples < 1:
            raise ValueError(f"max_bad_samples must be >= 1, got {self.max_bad_samples}")
        if self.shard_split not in SPLITS:
            raise ValueError(f"shard_split must be one of {SPLITS}, got {self.shard_split!r}")


def default_mix() -> dict[str, MixConfig]:
    """Paper defaults: image 57% x 38, video 30% x 8, audio 13% x 16; mask ratios 0.25 / 0.10 / 0.50.

    Timesteps follow the autoencoder ("auto"). Train shifts: audio 0.75 (public samples' names); image and
    video shifts are unknown (1.0). Token grids as the paper's latents: FLUX.2 AE 256 px (16x16 x 128 ch),
    Wan2.2 45 frames at 192x320 (12x12x20 x 48 ch), SongBloom 10 s (250 x 64 ch).
    """
    return {
        "image": MixConfig(0.57, 38, 0.25, TimestepConfig(AUTO), data=SyntheticConfig([1, 16, 16], 128)),
        "video": MixConfig(0.30, 8, 0.10, TimestepConfig(AUTO), data=SyntheticConfig([12, 12, 20], 48)),
        "audio": MixConfig(0.13, 16, 0.50, TimestepConfig(AUTO, shift=0.75), data=SyntheticConfig([250, 1, 1], 64)),
    }


def default_model() -> MMDiTConfig:
    """The paper's 625M trunk with image, video and audio projections."""
    return MMDiTConfig(projector_dim=1152, modalities={"image": [128, 128], "video": [48, 48], "audio": [64, 64]})


@dataclass
class TrainConfig(RunConfig):
    model: MMDiTConfig | SiTConfig = field(default_factory=default_model)  # `model.kind`: mmdit | sit
    # Layers null: the release's relative depths of the model (STUDENT_DEPTH, TEACHER_DEPTH above).
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(student_layer=None, teacher_layer=None))
    modalities: dict[str, MixConfig] = field(default_factory=default_mix)
    # Weights to start from (read by the weights-only unpickler, EMA first): a `selfflow export`, a run's
    # ema.safetensors, or the public selfflow_imagenet256.pt (with model.kind=sit). The trunk must match
    # exactly; only the projector may be missing or different (it then starts fresh). null: random init.
    init: str | None = None
    # read each micro-batch one early in a background thread (pinned on a GPU): data off the step's
    # critical path; the same batches in the same order, so resume stays exact (unknown in any
    # reference; on because it moves work off the critical path and changes no number)
    read_ahead: bool = True

    def __post_init__(self):
        super().__post_init__()
        total = sum(m.probability for m in self.modalities.values())
        if not self.modalities or abs(total - 1) > 1e-6:
            raise ValueError(f"modalities' probabilities must sum to 1, got {total}")
        objective, model = self.objective, self.model
        depth = model.depth
        if objective.student_layer is None:
            objective.student_layer = max(1, round(STUDENT_DEPTH * depth))
        if objective.teacher_layer is None:
            objective.teacher_layer = max(1, round(TEACHER_DEPTH * depth))
        if model.projector_kind is None:  # the head the objective needs
            model.projector_kind = "repa" if objective.method == "repa" else "selfflow"
        if isinstance(model, SiTConfig):
            check_sit_data(model, self.modalities)
        else:
            take_data_dims(model, self.modalities)
            for name, mix in self.modalities.items():
                dims = model.modalities.get(name)
                if mix.shards is None and dims != [mix.data.channels] * 2:
                    raise ValueError(
                        f"model.modalities.{name} must be [{mix.data.channels}, {mix.data.channels}], got {dims}"
                    )
        check_objective(objective, model)
        warn_wide_tokens(model)
        if objective.method == "repa":
            check_repa_modalities(objective, self.modalities)
        if objective.contrastive_weight:
            small = sorted(name for name, mix in self.modalities.items() if mix.batch_size < 2)
            if small:
                raise ValueError(f"objective.contrastive_weight needs batches of at least 2, {small} have 1")


def take_data_dims(model: MMDiTConfig, modalities: dict[str, MixConfig]) -> None:
    """Read what the data decides from `selfflow prepare`'s manifest.json: each modality's token width
    (`model.modalities.<name>`, replacing any value given) and the text setup (sentencepiece: `text_vocab`
    and `text_max_length`; encoder features: `context_dim`), so nothing is copied by hand from prepare's
    output. A shard folder without a manifest keeps the config's values (the job checks its data later).
    The resolved values are what the run saves in its config.yaml."""
    text = None
    for name, mix in modalities.items():
        found = read_manifest(mix.shards) if mix.shards else None
        if found is None:
            continue
        width = (found[1].get("modalities", {}).get(name) or {}).get("token_dim")
        if width:
            model.modalities[name] = [int(width), int(width)]
        text = text or found[1].get("text")
    if not text or not model.context_dim:
        return
    if text.get("vocab_size"):  # sentencepiece ids, embedded by the trunk's learned token table
        model.text_vocab = int(text["vocab_size"])
        model.text_max_length = int(text["config"]["max_length"])
    elif text.get("dim"):  # features of a text encoder (t5 / causal_lm)
        model.context_dim = int(text["dim"])
        model.text_vocab = 0


class WideTokenWarning(UserWarning):
    """A modality's tokens are wider than the trunk: velocity prediction cannot learn them well."""


def warn_wide_tokens(model: MMDiTConfig | SiTConfig) -> None:
    """Warn when a modality's token is wider than the hidden size. The input projection then drops
    part of the noise, which the velocity target `noise - x0` needs back in full: the velocity error
    cannot fall below the share of noise variance outside the projection, and the sampler leaves it in
    the samples (measured on the demo's raw waveform tokens of 400 samples through a 128-wide trunk:
    generated audio stayed noise). Latent tokens (FLUX.2 AE 128, Wan2.2 48, SongBloom 64 channels into
    1152) are far below; raw media tokens need patches no wider than the trunk (Li & He, "Back to
    Basics: Let Denoising Generative Models Denoise", 2025, make the same point and predict x0 instead:
    `model.prediction=x`, which this warning then leaves alone)."""
    if isinstance(model, MMDiTConfig) and model.prediction == "x":  # the head predicts x0: no noise to carry
        return
    widths = model.modalities if isinstance(model, MMDiTConfig) else {"image": [model.token_dim] * 2}
    for name, (width, _) in widths.items():
        if width > model.hidden_size:
            warnings.warn(
                f"model.modalities.{name}: {width}-wide tokens into a {model.hidden_size}-wide trunk: the input "
                "projection cannot carry all of the noise the velocity target needs (see warn_wide_tokens); use "
                "smaller patches or a wider model",
                WideTokenWarning,
                stacklevel=3,
            )


def check_sit_data(model: SiTConfig, modalities: dict[str, MixConfig]) -> None:
    """The SiT is a class-conditional image trunk: image tokens of its token width on its grid."""
    if list(modalities) != ["image"]:
        raise ValueError(
            f"model.kind sit trains image latents only: set modalities.video=null and modalities.audio=null "
            f"(modalities: {sorted(modalities)})"
        )
    data, g = modalities["image"].data, model.grid
    if modalities["image"].shards is None:
        if data.channels != model.token_dim or data.grid != [1, g, g]:
            raise ValueError(
                f"modalities.image.data must be grid [1, {g}, {g}] x {model.token_dim} channels for the SiT's "
                f"{model.input_size}x{model.input_size}x{model.in_channels} latents with patch {model.patch_size}, "
                f"got {data.grid} x {data.channels}"
            )
        if data.num_classes > model.null_class:
            raise ValueError(
                f"modalities.image.data.num_classes {data.num_classes} needs model.num_classes > it "
                f"(the last row is the null class), got {model.num_classes}"
            )


def check_objective(objective: ObjectiveConfig, model: MMDiTConfig | SiTConfig) -> None:
    """What the objective needs from the model, checked with the config (not at the first step)."""
    uses_projector = objective.rep_weight > 0
    if uses_projector and not model.projector_out:
        raise ValueError(f"objective {objective.method} needs model.projector_dim > 0 (the projector's width)")
    if uses_projector and objective.method == "selfflow" and model.projector_out != model.hidden_size:
        raise ValueError(
            f"Self-Flow aligns the projector's output to the teacher's hidden state: model.projector_dim must "
            f"equal model.hidden_size {model.hidden_size}, got {model.projector_dim}"
        )
    layers = [objective.student_layer, objective.teacher_layer]
    if max(layer or 0 for layer in layers) > model.depth:
        raise ValueError(f"objective layers must be <= model depth {model.depth}, got {layers}")
    if objective.method == "repa" and not objective.repa_encoder:
        raise ValueError("objective.method repa needs objective.repa_encoder (a local encoder folder)")


def check_repa_modalities(objective: ObjectiveConfig, modalities: dict[str, MixConfig]) -> None:
    """REPA serves images and (frame by frame) video through its image encoder; anything else must be
    listed in objective.repa_skip (trained with plain flow matching), never switched over silently."""
    unknown = sorted(set(objective.repa_skip) - set(modalities))
    if unknown:
        raise ValueError(f"objective.repa_skip names modalities this run does not train: {unknown}")
    for name, mix in modalities.items():
        if name in objective.repa_skip:
            continue
        if name not in REPA_MODALITIES:
            raise ValueError(
                f"objective.method repa: modality {name} has no REPA encoder (objective.repa_encoder is an image "
                f"encoder, used for images and video frames); drop it (modalities.{name}=null) or train it with "
                f"plain flow matching (objective.repa_skip=[{name}])"
            )
        if mix.shards is None:
            raw_modality(name, mix.data.channels)  # synthetic tokens must be raw pixel patches


def draw_modality(cfg: TrainConfig, step: int) -> str:
    """The modality of optimizer step `step` (all its micro-batches): the same on every rank."""
    u = np.random.default_rng(mix_seed(cfg.seed, step, 104729)).random()
    cumulative = 0.0
    for name, mix in cfg.modalities.items():
        cumulative += mix.probability
        if u < cumulative:
            return name
    return name


def micro_batch_modality(cfg: TrainConfig, accum: int, index: int) -> str:
    """The modality of the `index`-th micro-batch of a run (0-based): its optimizer step's."""
    return draw_modality(cfg, index // accum)


class PretrainTask:
    """Model, one batch stream per modality, and the Self-Flow / FM / REPA loss of a micro-batch.

    Everything the run reads is checked here, before the loop starts DeepSpeed: shards, their
    autoencoders (manifest.json; "auto" timesteps are resolved into `cfg`, which the loop then saves),
    REPA's decoders and the `init` weights.
    """

    def __init__(self, cfg: TrainConfig, repa: RepaTarget | None = None):
        self.cfg, self.repa = cfg, repa
        objective = cfg.objective
        if objective.method == "repa" and repa is None:
            raise ValueError("objective.method repa needs the encoder's target function")
        self.adapters = {}  # modality -> the adapter that decodes its tokens to pixels for REPA
        for name, mix in cfg.modalities.items():
            if mix.shards:
                shard_list(mix.shards)
            repa_here = objective.method == "repa" and name not in objective.repa_skip
            prepared = None  # synthetic latents count as raw media
            if mix.shards and (repa_here or mix.timesteps.distribution == AUTO):
                prepared = prepared_modality(mix.shards, name)
            if mix.timesteps.distribution == AUTO:
                kind = prepared.autoencoder if prepared is not None else "raw"
                mix.timesteps = replace(mix.timesteps, distribution=timestep_distribution(kind))
            if repa_here:
                self.adapters[name] = build_modality(prepared or raw_modality(name, mix.data.channels))
        self.init_state = None
        if cfg.init:
            self.init_state, _ = extract_state_dict(read_checkpoint(cfg.init))
        self.micro_batch = max(m.batch_size for m in cfg.modalities.values())
        self.streams: dict = {}
        self.ahead: ReadAhead | None = None

    def build_model(self) -> nn.Module:
        model = build_trunk(self.cfg.model)
        if self.init_state is not None:
            load_init(model, self.init_state, self.cfg.init)
            self.init_state = None  # the loop copies the model for the EMA; the file's tensors can go
        return model

    def open_data(self, rank: int, world: int, positions: dict[str, int]) -> None:
        """One endless batch stream per modality, fast-forwarded to the checkpoint's positions."""
        cfg = self.cfg
        for name, mix in cfg.modalities.items():
            position = positions.get(name, 0)
            if mix.shards:
                loader = LoaderConfig(mix.shards, max_bad_samples=mix.max_bad_samples, split=mix.shard_split)
                self.streams[name] = LatentStream(loader, mix.batch_size, cfg.seed, rank, position, world)
            else:
                data = SyntheticLatents(name, mix.data, cfg.seed)
                self.streams[name] = SyntheticStream(data, mix.batch_size, rank, position)
        if cfg.read_ahead:
            accum = cfg.deepspeed.grad_accum
            order = partial(micro_batch_modality, cfg, accum)
            self.ahead = ReadAhead(self.streams, order, pin=torch.cuda.is_available())

    def positions(self) -> dict[str, int]:
        if self.ahead is not None:
            return self.ahead.positions()
        return {name: stream.position for name, stream in self.streams.items()}

    def next_batch(self, step: int, micro: int):
        """Micro-batch `micro` of optimizer step `step` (0-based), read ahead when `read_ahead`."""
        if self.ahead is None:
            return next(self.streams[draw_modality(self.cfg, step)])
        return self.ahead.take(step * self.cfg.deepspeed.grad_accum + micro)

    def loss(self, models: Models, step: int, micro: int, generator: torch.Generator) -> StepOutput:
        """Condition dropout, dual-timestep noising, student and teacher passes for one micro-batch."""
        cfg, device = self.cfg, models.device
        modality = draw_modality(cfg, step)
        start = time.perf_counter()
        batch = self.next_batch(step, micro)
        data_time = time.perf_counter() - start
        objective, target = cfg.objective, None
        if objective.method == "repa" and modality in objective.repa_skip:
            objective = replace(objective, method="fm")  # listed in repa_skip: plain flow matching
        elif objective.method == "repa" and objective.rep_weight > 0:
            adapter = self.adapters[modality].to(device)
            target = repa_targets(adapter, batch.x0, batch.ids, self.repa, device)
        x0, ids = batch.x0.to(device, non_blocking=True), batch.ids.to(device, non_blocking=True)
        # Condition dropout for CFG: null class and no text; the teacher gets the same condition.
        keep = drop_condition(len(x0), cfg.objective.cond_dropout, generator)
        y = txt = txt_mask = None
        if cfg.model.num_classes:
            y = torch.where(keep & (batch.labels >= 0), batch.labels, cfg.model.num_classes - 1).to(device)
        if isinstance(cfg.model, SiTConfig):  # SiT(x, t, y, ids): class-conditional only
            args, kwargs = (y, ids), {}
        else:  # MMDiT(x, t, ids, txt=..., y=..., modality=...)
            if batch.text is not None and cfg.model.context_dim:
                txt = batch.text.to(device)
                txt_mask = (batch.text_mask & keep[:, None]).to(device)
            args, kwargs = (ids,), {"txt": txt, "txt_mask": txt_mask, "y": y, "modality": modality}
        mix = cfg.modalities[modality]
        noised = noise_batch(x0, mix.timesteps, mix.mask_ratio, objective, generator)

        def student(x, t, layer):
            x = x.to(models.dtype)
            if layer is None:
                return models.student(x, t, *args, **kwargs).float()
            out = models.student.forward_with_features(x, t, *args, layer=layer, **kwargs)
            return out.velocity.float(), out.features.float()

        def teacher(x, t, layer):
            with models.teacher() as model:
                return model.hidden_states(x, t, *args, layer=layer, **kwargs).float()

        terms = training_loss(objective, x0, noised, student, teacher, target_features=target)
        return StepOutput(terms, modality, len(x0), x0.shape[0] * x0.shape[1], data_time=data_time)


def load_init(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`init` weights into `model`: every trunk tensor must be there with its shape; a projector the file
    lacks, or holds in another shape (another head), starts fresh."""
    own = model.state_dict()
    fresh = [k for k, v in state.items() if k.startswith("projector.") and k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in fresh}
    report = load_weights(model, state)
    missing = [k for k in report.missing if not k.startswith("projector.") and k != "pos_embed"]
    unexpected = [k for k in report.unexpected if not k.startswith("projector.")]
    if missing or unexpected:
        raise ValueError(
            f"init={source} does not fit model ({model.cfg.kind}): missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}) (a changed model config?)"
        )
    starts_fresh = sorted({*fresh, *(k for k in report.missing if k.startswith("projector."))})
    loaded = len(state) - len(report.unexpected)
    tqdm.write(f"init: {loaded} tensors from {source}; starting fresh: {', '.join(starts_fresh) or '-'}")


def train(cfg: TrainConfig, repa: RepaTarget | None = None, callbacks: Sequence[Periodic] = ()) -> Path:
    """Train to `cfg.steps` optimizer steps; returns the run folder. Inputs are checked before anything starts."""
    return run(cfg, PretrainTask(cfg, repa), callbacks)
