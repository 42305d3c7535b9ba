"""`selfflow robotics finetune`: video-action finetuning of a pretrained trunk on converted robot clips.

Starts from a `selfflow export` file (or none): every parameter the pretrained model has is
loaded (a shape mismatch is an error naming the key: the trunk must match), the ones it lacks
(the action modality's input and output projections) keep their fresh initialisation, and the
load report (missing / unexpected keys) is printed. Training is the run loop of pretraining
(`selfflow.training.run`: DeepSpeed, the EMA teacher, checkpoints with exact resume, the collective
finiteness check, MLflow, `metrics.jsonl`); only the batch (`clips.ClipStream`) and the loss
(`video_action.video_action_loss`) are this task's.

    selfflow robotics finetune --config configs/robotics/tiny.yaml init=runs/demo/export/ema.safetensors
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from selfflow.backbone.checkpoint import load_weights, read_checkpoint
from selfflow.backbone.mmdit import MMDiT, MMDiTConfig, build_mmdit
from selfflow.robotics.clips import ClipDataConfig, ClipStream
from selfflow.robotics.video_action import VideoActionConfig, video_action_loss
from selfflow.training.objective import ObjectiveConfig
from selfflow.training.run import Models, RunConfig, StepOutput, run
from selfflow.training.schedules import EMAConfig
from selfflow.training.train import check_objective, warn_wide_tokens


def robot_model() -> MMDiTConfig:
    """A small trunk with video and action modalities (raw 8x8 frame patches, 7-dim actions)."""
    return MMDiTConfig(
        hidden_size=64,
        num_heads=4,
        depth_double=2,
        depth_single=2,
        axes_dim=[4, 6, 6],
        context_dim=32,
        text_vocab=256,
        text_max_length=64,
        num_classes=0,
        projector_dim=64,
        modalities={"video": [192, 192], "action": [7, 7]},
    )


@dataclass
class FinetuneConfig(RunConfig):
    init: str | None = None  # a `selfflow export` file to start from; None: random initialisation
    model: MMDiTConfig = field(default_factory=robot_model)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(student_layer=1, teacher_layer=3))
    video_action: VideoActionConfig = field(default_factory=VideoActionConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    batch_size: int = 8  # clips per process
    run_dir: str = "runs/robotics"
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.999))  # unknown; short finetunes need a faster EMA

    def __post_init__(self):
        super().__post_init__()
        missing = {"video", "action"} - set(self.model.modalities)
        if missing:
            raise ValueError(f"model.modalities needs video and action entries, missing {sorted(missing)}")
        if self.model.modalities["action"][0] != self.data.action_dim:
            raise ValueError(f"model.modalities.action {self.model.modalities['action']} != data.action_dim")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_objective(self.objective, self.model)
        if self.objective.contrastive_weight:
            raise ValueError(
                "objective.contrastive_weight (Delta-FM) is for pretraining; video-action finetuning has no such term"
            )
        warn_wide_tokens(self.model)


def init_model(cfg: FinetuneConfig, weights: dict | None = None) -> MMDiT:
    """The trunk, with every pretrained tensor of matching name and shape loaded from `cfg.init`
    (or from `weights`, that file already read)."""
    model = build_mmdit(cfg.model)
    if cfg.init:
        report = load_weights(model, weights if weights is not None else cfg.init, strict=False)
        tqdm.write(f"finetune: loaded {cfg.init}\n{report}")
    return model


class FinetuneTask:
    """The trunk from `init`, the clip stream and the joint video-action loss."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg, self.micro_batch = cfg, cfg.batch_size
        # inputs are checked before anything starts: the weights are read (safely) here
        self.weights = read_checkpoint(cfg.init) if cfg.init else None
        if not Path(cfg.data.shards).exists():
            raise FileNotFoundError(f"clip shards not found: {cfg.data.shards}")
        self.clips: ClipStream | None = None

    def build_model(self) -> MMDiT:
        return init_model(self.cfg, self.weights)

    def open_data(self, rank: int, world: int, positions: dict[str, int]) -> None:
        cfg = self.cfg
        self.clips = ClipStream(cfg.data, cfg.model, cfg.batch_size, cfg.seed, rank, positions.get("clips", 0), world)

    def positions(self) -> dict[str, int]:
        return {"clips": self.clips.position}

    def loss(self, models: Models, step: int, micro: int, generator: torch.Generator) -> StepOutput:
        """One batch of clips: frames and actions noised, the joint loss (+ Self-Flow's terms)."""
        start = time.perf_counter()
        clip = self.clips.next_batch(models.device)
        data_time = time.perf_counter() - start
        cond = {} if clip.text is None else {"txt": clip.text, "txt_mask": clip.text_mask}
        modality = ("video", "action")

        def student(x, t, ids, layer):
            x = tuple(part.to(models.dtype) for part in x)
            if layer is None:
                return tuple(v.float() for v in models.student(x, t, ids, modality=modality, **cond))
            out = models.student.forward_with_features(x, t, ids, modality=modality, layer=layer, **cond)
            return (*(v.float() for v in out.velocity), out.features.float())

        def teacher(x, t, ids, layer):
            with models.teacher() as model:
                return model.hidden_states(x, t, ids, modality=modality, layer=layer, **cond).float()

        terms = video_action_loss(self.cfg.objective, self.cfg.video_action, clip, student, teacher, generator)
        tokens = clip.context.shape[1] + clip.future.shape[1] + clip.actions.shape[1]
        return StepOutput(
            terms, "clips", len(clip.actions), len(clip.actions) * tokens, kind="robot", data_time=data_time
        )


def finetune(cfg: FinetuneConfig) -> Path:
    """Finetune to `cfg.steps` steps; returns the run folder."""
    return run(cfg, FinetuneTask(cfg))
