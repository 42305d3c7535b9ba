"""`selfflow train`: the pretraining task on the run loop, plus what training borrows from evaluation.

Training (`selfflow.training`) never imports `selfflow.eval`; this job composes the two: periodic
evaluation of the EMA weights is a callback given to the run loop, and REPA's frozen external
encoder (`selfflow.eval.encoders.RepaEncoder`) is given to the pretraining task as a function (the task
decodes latents to pixels; the encoder turns pixels into patch features).

    selfflow train --config configs/train/demo.yaml        # = pretrain(load_config(PretrainConfig, ...))
    selfflow train --config configs/train/sit_xl2_imagenet256.yaml init=/models/selfflow_imagenet256.pt
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from selfflow.backbone.sit import SiTConfig
from selfflow.eval.evaluate import EvalConfig, evaluate, flat, write_eval
from selfflow.training.run import Periodic, Run
from selfflow.training.train import RepaTarget, TrainConfig, train


@dataclass
class PretrainConfig(TrainConfig):
    eval_every: int = 0  # evaluate the EMA weights every N optimizer steps and at the end (0: never)
    eval: EvalConfig = field(default_factory=EvalConfig)  # what periodic evaluation samples and measures

    def __post_init__(self):
        super().__post_init__()
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.eval_every and isinstance(self.model, SiTConfig):
            raise ValueError(
                "eval_every: periodic evaluation samples the MMDiT's captioned data; for model.kind sit set "
                "eval_every=0 and sample an export with `selfflow sample`"
            )
        if self.eval_every:
            # Periodic evaluation scores what this run trains: a modality the run does not train keeps the
            # default config's input projection (untrained, at the paper's width) and is left out.
            trained = [m for m in self.eval.modalities if m in self.modalities]
            if not trained:
                raise ValueError(
                    f"eval.modalities {self.eval.modalities} names no modality this run trains "
                    f"({sorted(self.modalities)}): periodic evaluation would score nothing"
                )
            self.eval.modalities = trained


def periodic_eval(cfg: EvalConfig) -> Callable[[Run, int], None]:
    """Evaluate the EMA weights into run_dir/evals/step_<step>, metrics to MLflow (`eval/...`).

    Every rank enters the gather (ZeRO-3 assembles the teacher's weights collectively) and samples and
    embeds its share of the items; rank 0 computes the numbers and writes them. A failure on any rank
    stops every rank with it.
    """

    def evaluate_ema(job: Run, step: int) -> None:
        with job.ema.gathered() as model:
            out = job.run_dir / "evals" / f"step_{step:07d}"
            result = evaluate(model, cfg, out, step)
            if job.info.rank == 0:
                write_eval(result, {"path": str(job.run_dir), "step": step, "weights": "ema"}, out)
                metrics = result["metrics"].items()
                job.tracker.log_metrics({f"eval/{m}/{k}": v for m, ms in metrics for k, v in flat(ms).items()}, step)

    return evaluate_ema


def repa_target(cfg: TrainConfig) -> RepaTarget:
    """REPA's targets from the local encoder, loaded on first use on the device the loss runs on; its
    feature width is checked against the model's projector now, before anything starts."""
    path = Path(cfg.objective.repa_encoder)
    if not path.exists():
        raise FileNotFoundError(f"objective.repa_encoder not found: {path}")
    from selfflow.eval.encoders import RepaEncoder, repa_feature_dim  # here: transformers takes seconds

    width = repa_feature_dim(path)
    if cfg.model.projector_out != width:
        raise ValueError(
            f"objective.repa_encoder {path} gives {width}-wide features: model.projector_dim must be {width} "
            f"(REPA's projector ends at the encoder's width), got {cfg.model.projector_dim}"
        )
    encoder: RepaEncoder | None = None

    def target(images: Tensor, grid: tuple[int, int], device: torch.device) -> Tensor:
        nonlocal encoder
        if encoder is None:
            encoder = RepaEncoder(path, device, image_size=cfg.objective.repa_image_size or None)
        return encoder(images, grid).to(device)

    return target


def pretrain(cfg: PretrainConfig) -> Path:
    """Train to `cfg.steps` steps with periodic evaluation; returns the run folder."""
    repa = repa_target(cfg) if cfg.objective.method == "repa" else None
    callbacks = [Periodic(cfg.eval_every, periodic_eval(cfg.eval), "evaluation")] if cfg.eval_every else []
    return train(cfg, repa, callbacks)
