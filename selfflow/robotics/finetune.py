"""`selfflow robotics finetune`: video-action finetuning of a pretrained trunk on converted robot clips.

Starts from a `selfflow export` file (or none): every parameter the pretrained model has is
loaded (a shape mismatch is an error naming the key: the trunk must match), the ones it lacks
(the action modality's input and output projections) keep their fresh initialisation, and the
load report (missing / unexpected keys) is printed. Training reuses the pretraining helpers:
the DeepSpeed engine, the ZeRO-aware EMA teacher, run-folder checkpoints with exact resume, MLflow
tracking and `metrics.jsonl`; only the batch (`clips.ClipStream`) and the loss
(`video_action.video_action_loss`) differ.

    selfflow robotics finetune --config configs/robotics/tiny.yaml init=runs/demo/export/ema.safetensors
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from selfflow.backbone.checkpoint import load_weights
from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.config import save_config
from selfflow.data.batch import mix_seed
from selfflow.robotics.clips import ClipDataConfig, ClipStream
from selfflow.robotics.video_action import VideoActionConfig, video_action_loss
from selfflow.training.engine import DeepSpeedConfig, EMATeacher, Engine, fresh_copy, init_distributed, shutdown
from selfflow.training.objective import ObjectiveConfig
from selfflow.training.tracking import Tracker, TrackingConfig
from selfflow.training.train import (
    EMAConfig,
    NonFiniteLossError,
    TrainState,
    append_jsonl,
    ema_decay,
    non_finite,
    resume,
    save,
)


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
class FinetuneConfig:
    init: str | None = None  # a `selfflow export` file to start from; None: random initialisation
    model: MMDiTConfig = field(default_factory=robot_model)
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(student_layer=1, teacher_layer=3))
    video_action: VideoActionConfig = field(default_factory=VideoActionConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.999))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    batch_size: int = 8  # clips per process
    run_dir: str = "runs/robotics"
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = True

    def __post_init__(self):
        missing = {"video", "action"} - set(self.model.modalities)
        if missing:
            raise ValueError(f"model.modalities needs video and action entries, missing {sorted(missing)}")
        if self.model.modalities["action"][0] != self.data.action_dim:
            raise ValueError(f"model.modalities.action {self.model.modalities['action']} != data.action_dim")
        if min(self.steps, self.batch_size, self.save_every, self.log_every, self.keep_checkpoints) < 1:
            raise ValueError("steps, batch_size, save_every, log_every and keep_checkpoints must be >= 1")


def init_model(cfg: FinetuneConfig):
    """The trunk, with every pretrained tensor of matching name and shape loaded from `cfg.init`."""
    model = build_mmdit(cfg.model)
    if cfg.init:
        report = load_weights(model, cfg.init, strict=False)
        tqdm.write(f"finetune: loaded {cfg.init}\n{report}")
    return model


def finetune(cfg: FinetuneConfig) -> Path:
    """Finetune to `cfg.steps` steps; returns the run folder."""
    info = init_distributed()
    run_dir = Path(cfg.run_dir)
    try:
        _finetune(cfg, info, run_dir)
    finally:
        shutdown()
    return run_dir


def _finetune(cfg: FinetuneConfig, info, run_dir: Path) -> None:
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    model = init_model(cfg)
    teacher_init = fresh_copy(model)
    engine = Engine.create(model, cfg.deepspeed, micro_batch=cfg.batch_size, device=info.device)
    ema = EMATeacher.create(engine, teacher_init)
    state = resume(cfg, engine, ema, run_dir) if cfg.resume else TrainState()
    tracker = Tracker(cfg.tracking, run_dir, info.rank, run_id=state.run_id)
    state.run_id = tracker.run_id
    tracker.log_params(cfg)
    clips = ClipStream(cfg.data, cfg.model, cfg.batch_size, cfg.seed, info.rank, state.data_position.get("clips", 0))
    bar = tqdm(range(state.step, cfg.steps), initial=state.step, total=cfg.steps, disable=info.rank != 0)
    status = "FAILED"
    try:
        for step in bar:
            start = time.perf_counter()
            metrics = finetune_step(cfg, engine, ema, clips, info, step)
            state.step, state.data_position["clips"] = step + 1, clips.position
            metrics["step_time"] = time.perf_counter() - start
            if info.rank == 0:
                append_jsonl(run_dir / "metrics.jsonl", {"step": state.step, **metrics})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", fm=f"{metrics['fm']:.4f}", rep=f"{metrics['rep']:.3f}")
            if state.step % cfg.log_every == 0:
                tracker.log_metrics(metrics, state.step)
            if state.step % cfg.save_every == 0 or state.step == cfg.steps:
                save(cfg, engine, ema, state, run_dir, info.rank)
        status = "FINISHED"
    finally:
        tracker.close(status)


def finetune_step(cfg: FinetuneConfig, engine: Engine, ema: EMATeacher, clips: ClipStream, info, step: int) -> dict:
    """One batch of clips: the joint loss, backward, optimizer step, EMA update."""
    module, device = engine.module, info.device
    clip = clips.next_batch(device)
    cond = {} if clip.text is None else {"txt": clip.text, "txt_mask": clip.text_mask}
    modality = ("video", "action")

    def student(x, t, ids, layer):
        x = tuple(part.to(engine.dtype) for part in x)
        if layer is None:
            return tuple(v.float() for v in module(x, t, ids, modality=modality, **cond))
        out = module.forward_with_features(x, t, ids, modality=modality, layer=layer, **cond)
        return (*(v.float() for v in out.velocity), out.features.float())

    def teacher(x, t, ids, layer):
        with ema.gathered() as model:
            return model.hidden_states(x, t, ids, modality=modality, layer=layer, **cond).float()

    gen = torch.Generator().manual_seed(mix_seed(cfg.seed, step, info.rank))
    terms = video_action_loss(cfg.objective, cfg.video_action, clip, student, teacher, gen)
    bad = non_finite(terms)
    if bad:
        raise NonFiniteLossError(f"step {step + 1}, robot clips: loss term {bad} is not finite")
    engine.backward(terms.total)
    engine.step()
    ema.update(ema_decay(cfg.ema, step))
    return {
        "loss": terms.total.item(),
        "fm": terms.fm.item(),
        "rep": terms.rep.item(),
        "lr": engine.lr,
        "grad_norm": engine.grad_norm,
    }
