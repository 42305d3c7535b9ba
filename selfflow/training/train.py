"""`selfflow train`: Self-Flow (or flow matching / REPA) on the shared MMDiT trunk with DeepSpeed.

Each optimizer step draws one modality (a function of `(seed, step)`, so every rank agrees)
and trains on that modality's micro-batch; noise, timesteps, masks and condition dropout
come from `(seed, step, rank)`, so a resumed run repeats the uninterrupted one bit for bit.

    selfflow train --config configs/train/tiny.yaml                    # one process
    torchrun --nproc-per-node 8 -m selfflow.cli train --config ...     # one node, 8 GPUs
"""

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from selfflow.backbone.mmdit import MMDiT, MMDiTConfig, build_mmdit
from selfflow.config import save_config
from selfflow.data.batch import LatentBatch, mix_seed
from selfflow.data.loader import LatentStream, LoaderConfig
from selfflow.data.synthetic import SyntheticConfig, SyntheticLatents, SyntheticStream
from selfflow.eval.evaluate import EvalConfig, evaluate, flat, write_eval
from selfflow.flow.paths import TimestepConfig
from selfflow.modalities.grid import unpatchify
from selfflow.training import checkpoints
from selfflow.training.engine import (
    DeepSpeedConfig,
    DistInfo,
    EMATeacher,
    Engine,
    any_rank,
    barrier,
    fresh_copy,
    init_distributed,
    shutdown,
)
from selfflow.training.objective import (
    LossTerms,
    ObjectiveConfig,
    RepaEncoder,
    drop_condition,
    noise_batch,
    training_loss,
)
from selfflow.training.tracking import Tracker, TrackingConfig


@dataclass
class MixConfig:
    """One modality's share of training and its noising defaults (paper section 4)."""

    probability: float = 1.0
    batch_size: int = 8  # per process
    mask_ratio: float = 0.25
    timesteps: TimestepConfig = field(default_factory=lambda: TimestepConfig("logit_normal"))
    shards: str | None = None  # latent shards from `selfflow prepare`; None: the in-memory synthetic latents
    data: SyntheticConfig = field(default_factory=SyntheticConfig)  # used when shards is None

    def __post_init__(self):
        if not 0 <= self.probability <= 1 or self.batch_size < 1 or not 0 <= self.mask_ratio <= 1:
            raise ValueError("probability and mask_ratio must be in [0, 1] and batch_size >= 1")


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
class EMAConfig:
    decay: float = 0.9999
    warmup: bool = False  # decay_t = min(decay, (1 + t) / (10 + t))

    def __post_init__(self):
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")


def ema_decay(cfg: EMAConfig, step: int) -> float:
    """EMA decay after optimizer step `step` (0-based): a pure function of the step."""
    return min(cfg.decay, (1 + step) / (10 + step)) if cfg.warmup else cfg.decay


@dataclass
class TrainConfig:
    model: MMDiTConfig = field(default_factory=default_model)
    # Paper's layers for the 21-block MMDiT are unknown: SiT-XL's relative depths (8/28, 20/28) -> 6, 15.
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(student_layer=6, teacher_layer=15))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    modalities: dict[str, MixConfig] = field(default_factory=default_mix)
    run_dir: str = "runs/selfflow"
    steps: int = 1000  # optimizer steps in total (a resumed run continues to this count)
    seed: int = 0
    log_every: int = 10  # MLflow logging period; metrics.jsonl gets every step
    save_every: int = 500
    keep_checkpoints: int = 3
    nan_policy: str = "stop"  # "stop": raise naming step, modality and term; "skip": skip and count
    resume: bool = True  # continue from the run folder's latest complete checkpoint if there is one
    compile: bool = False  # torch.compile every trunk block of student and teacher (ZeRO 0-2)
    eval_every: int = 0  # evaluate the EMA weights every N optimizer steps and at the end (0: never)
    eval: EvalConfig = field(default_factory=EvalConfig)  # what periodic evaluation samples and measures

    def __post_init__(self):
        total = sum(m.probability for m in self.modalities.values())
        if not self.modalities or abs(total - 1) > 1e-6:
            raise ValueError(f"modalities' probabilities must sum to 1, got {total}")
        for name, mix in self.modalities.items():
            dims = self.model.modalities.get(name)
            if mix.shards is None and dims != [mix.data.channels] * 2:
                raise ValueError(
                    f"model.modalities.{name} must be [{mix.data.channels}, {mix.data.channels}], got {dims}"
                )
        if self.objective.method != "fm" and self.objective.gamma > 0 and not self.model.projector_dim:
            raise ValueError(f"objective {self.objective.method} needs model.projector_dim > 0 (the projector's width)")
        if max(self.objective.student_layer, self.objective.teacher_layer) > self.model.depth:
            raise ValueError(f"objective layers must be <= model depth {self.model.depth}")
        if self.objective.method == "repa" and not self.objective.repa_encoder:
            raise ValueError("objective.method repa needs objective.repa_encoder (a local encoder folder)")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        if self.nan_policy == "skip" and self.deepspeed.grad_accum != 1:
            raise ValueError("nan_policy 'skip' needs deepspeed.grad_accum = 1")
        if self.compile and self.deepspeed.zero_stage == 3:
            raise ValueError("compile is supported with deepspeed.zero_stage 0-2 (ZeRO-3 gathers inside blocks)")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.steps < 1 or self.save_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ValueError("steps, save_every, keep_checkpoints and log_every must be >= 1")


@dataclass
class TrainState:
    """Everything a checkpoint holds besides model, optimizer and EMA weights."""

    step: int = 0  # optimizer steps done; also the data position (batches are a function of it)
    run_id: str | None = None  # MLflow run continued on resume
    skipped: int = 0  # non-finite steps skipped
    data_position: dict[str, int] = field(default_factory=dict)  # batches each modality's stream delivered


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf (the message names the step, the modality and the term)."""


def draw_modality(cfg: TrainConfig, micro_step: int) -> str:
    """The modality of a micro-step: the same on every rank."""
    u = np.random.default_rng(mix_seed(cfg.seed, micro_step, 104729)).random()
    cumulative = 0.0
    for name, mix in cfg.modalities.items():
        cumulative += mix.probability
        if u < cumulative:
            return name
    return name


def train(cfg: TrainConfig) -> Path:
    """Train to `cfg.steps` optimizer steps; returns the run folder."""
    info = init_distributed()
    run_dir = Path(cfg.run_dir)
    try:
        _train(cfg, info, run_dir)
    finally:
        shutdown()
    return run_dir


def _train(cfg: TrainConfig, info: DistInfo, run_dir: Path) -> None:
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_mmdit(cfg.model)
    if info.rank == 0:
        tqdm.write(f"model parameters: {sum(p.numel() for p in model.parameters()):,}")
    teacher_init = fresh_copy(model)
    max_batch = max(m.batch_size for m in cfg.modalities.values())
    engine = Engine.create(model, cfg.deepspeed, micro_batch=max_batch, device=info.device)
    ema = EMATeacher.create(engine, teacher_init)
    if cfg.compile:  # block by block: one graph per block kind and token count, DeepSpeed stays eager
        for trunk in (engine.module, ema.teacher):
            for block in [*trunk.double_blocks, *trunk.single_blocks]:
                block.compile()
    state = resume(cfg, engine, ema, run_dir) if cfg.resume else TrainState()

    tracker = Tracker(cfg.tracking, run_dir, info.rank, run_id=state.run_id)
    state.run_id = tracker.run_id
    if tracker.run_id is not None:  # lets `selfflow report` attach its files to this MLflow run
        (run_dir / "mlflow_run.json").write_text(json.dumps({"tracking_uri": tracker.uri, "run_id": tracker.run_id}))
    tracker.log_params(cfg)
    tracker.log_artifact(run_dir / "config.yaml")
    data = build_streams(cfg, info.rank, state.data_position)
    repa = None
    if cfg.objective.method == "repa":
        repa = RepaEncoder(cfg.objective.repa_encoder, info.device, image_size=cfg.objective.repa_image_size or None)

    bar = tqdm(range(state.step, cfg.steps), initial=state.step, total=cfg.steps, disable=info.rank != 0)
    status = "FAILED"
    try:
        for step in bar:
            start = time.perf_counter()
            metrics = optimizer_step(cfg, engine, ema, data, repa, info, step, state)
            metrics["step_time"] = time.perf_counter() - start
            metrics["samples_per_s"] = metrics.pop("samples") * info.world / metrics["step_time"]
            metrics["tokens_per_s"] = metrics.pop("tokens") * info.world / metrics["step_time"]
            state.step = step + 1
            if info.rank == 0:
                append_jsonl(run_dir / "metrics.jsonl", {"step": state.step, **metrics})
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    fm=f"{metrics['fm']:.4f}",
                    rep=f"{metrics['rep']:.3f}",
                    step_s=f"{metrics['step_time']:.3f}",
                    samples_s=f"{metrics['samples_per_s']:.1f}",
                )
            if state.step % cfg.log_every == 0:
                tracker.log_metrics(metrics, state.step)
            if state.step % cfg.save_every == 0 or state.step == cfg.steps:
                folder = save(cfg, engine, ema, state, run_dir, info.rank)
                tracker.log_artifact(folder / "state.json", "checkpoints/" + folder.name)
            if cfg.eval_every and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                periodic_eval(cfg, ema, tracker, run_dir, state.step, info.rank)
        status = "FINISHED"
    finally:
        tracker.close(status)


def periodic_eval(cfg: TrainConfig, ema: EMATeacher, tracker: Tracker, run_dir: Path, step: int, rank: int) -> None:
    """Evaluate the EMA weights on rank 0 into run_dir/evals/step_<step>, metrics to MLflow (`eval/...`).

    Every rank enters the gather (ZeRO-3 assembles the teacher's weights collectively) and waits.
    """
    with ema.gathered() as model:
        if rank == 0:
            out = run_dir / "evals" / f"step_{step:07d}"
            result = evaluate(model, cfg.eval, out, step)
            write_eval(result, {"path": str(run_dir), "step": step, "weights": "ema"}, out)
            numbers = {f"eval/{m}/{k}": v for m, metrics in result["metrics"].items() for k, v in flat(metrics).items()}
            tracker.log_metrics(numbers, step)
    barrier()


def optimizer_step(
    cfg, engine: Engine, ema: EMATeacher, data, repa, info: DistInfo, step: int, state: TrainState
) -> dict:
    """Gradient accumulation over `grad_accum` micro-batches, the optimizer step, the EMA update."""
    ga = cfg.deepspeed.grad_accum
    sums = {"loss": 0.0, "fm": 0.0, "rep": 0.0, "samples": 0, "tokens": 0}
    per_modality = {}
    for micro in range(ga):
        modality = draw_modality(cfg, step * ga + micro)
        batch = next(data[modality])
        state.data_position[modality] = data[modality].position
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, step, micro, info.rank))
        terms = micro_step_loss(cfg, engine, ema, batch, modality, gen, info.device, repa)
        bad = non_finite(terms)
        if any_rank(bad is not None):
            where = f"step {step + 1}, modality {modality}: loss term {bad or 'on another rank'} is not finite"
            if cfg.nan_policy == "stop":
                raise NonFiniteLossError(f"{where}; stopping (the last complete checkpoint is kept)")
            state.skipped += 1
            tqdm.write(f"skipping {where} ({state.skipped} skipped so far)")
            return {
                "loss": math.nan,
                "fm": math.nan,
                "rep": math.nan,
                "samples": 0,
                "tokens": 0,
                "skipped": state.skipped,
            }
        engine.backward(terms.total)  # DeepSpeed divides by grad_accum itself
        engine.step()
        for key in ("loss", "fm", "rep"):
            sums[key] += getattr(terms, "total" if key == "loss" else key).item() / ga
        sums["samples"] += batch.x0.shape[0]
        sums["tokens"] += batch.x0.shape[0] * batch.x0.shape[1]
        per_modality[f"loss/{modality}"] = terms.total.item()
    ema.update(ema_decay(cfg.ema, step))
    return {**sums, **per_modality, "lr": engine.lr, "grad_norm": engine.grad_norm, "skipped": state.skipped}


def build_streams(cfg: TrainConfig, rank: int, positions: dict[str, int]) -> dict:
    """One endless batch stream per modality, fast-forwarded to the checkpoint's positions."""
    streams = {}
    for name, mix in cfg.modalities.items():
        position = positions.get(name, 0)
        if mix.shards:
            streams[name] = LatentStream(LoaderConfig(mix.shards), mix.batch_size, cfg.seed, rank, position)
        else:
            streams[name] = SyntheticStream(SyntheticLatents(name, mix.data, cfg.seed), mix.batch_size, rank, position)
    return streams


def micro_step_loss(
    cfg, engine: Engine, ema: EMATeacher, batch: LatentBatch, modality: str, gen, device, repa
) -> LossTerms:
    """Condition dropout, dual-timestep noising, student and teacher passes for one micro-batch."""
    module: MMDiT = engine.module
    objective, target = cfg.objective, None
    if objective.method == "repa":  # REPA's encoder sees images; other modalities train plain flow matching
        if modality == "image":
            grid = (int(batch.ids[0, :, 1].max()) + 1, int(batch.ids[0, :, 2].max()) + 1)
            target = repa(pixels(batch), grid).to(device)
        else:
            objective = replace(objective, method="fm")
    x0, ids = batch.x0.to(device), batch.ids.to(device)
    # Condition dropout for CFG: null class and no text; the teacher gets the same condition.
    keep = drop_condition(len(x0), cfg.objective.cond_dropout, gen)
    y = txt = txt_mask = None
    if cfg.model.num_classes:
        y = torch.where(keep & (batch.labels >= 0), batch.labels, cfg.model.num_classes - 1).to(device)
    if batch.text is not None and cfg.model.context_dim:
        txt = batch.text.to(device)
        txt_mask = (batch.text_mask & keep[:, None]).to(device)
    mix = cfg.modalities[modality]
    noised = noise_batch(x0, mix.timesteps, mix.mask_ratio, objective, gen)
    cond = {"txt": txt, "txt_mask": txt_mask, "y": y, "modality": modality}

    def student(x, t, layer):
        x = x.to(engine.dtype)
        if layer is None:
            return module(x, t, ids, **cond).float()
        out = module.forward_with_features(x, t, ids, layer=layer, **cond)
        return out.velocity.float(), out.features.float()

    def teacher(x, t, layer):
        bf16 = engine.dtype == torch.bfloat16 and device.type == "cuda"
        with ema.gathered() as model, torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            return model.hidden_states(x, t, ids, layer=layer, **cond).float()

    terms = training_loss(objective, x0, noised, student, teacher, target_features=target)
    return terms._replace(total=terms.total + module.other_modalities_zero(modality))


def pixels(batch: LatentBatch) -> torch.Tensor:
    """Images `(B, 3, H, W)` from raw-pixel image tokens (`3 * p * p` channels per token)."""
    channels = batch.x0.shape[-1]
    patch = math.isqrt(channels // 3)
    if 3 * patch * patch != channels:
        raise ValueError(f"REPA needs raw-pixel image tokens (3 * p * p channels), got {channels} channels")
    h, w = int(batch.ids[0, :, 1].max()) + 1, int(batch.ids[0, :, 2].max()) + 1
    return unpatchify(batch.x0, batch.ids, patch, 3, h, w)


def non_finite(terms: LossTerms) -> str | None:
    """The first loss term that is NaN or inf, or None."""
    for name in ("fm", "rep", "total"):
        if not torch.isfinite(getattr(terms, name)).all():
            return name
    return None


def save(cfg: TrainConfig, engine: Engine, ema: EMATeacher, state: TrainState, run_dir: Path, rank: int) -> Path:
    """Every rank writes its part; rank 0 seals the folder and moves `latest` once all are done."""
    folder = checkpoints.checkpoint_dir(run_dir, state.step)
    engine.save(folder, client_state=asdict(state))
    ema.save(folder / "ema.safetensors")
    barrier()
    if rank == 0:
        checkpoints.write_state(folder, asdict(state))
        save_config(cfg, folder / "config.yaml")
        checkpoints.mark_complete(folder)
        checkpoints.prune(run_dir, cfg.keep_checkpoints)
    barrier()
    return folder


def resume(cfg: TrainConfig, engine: Engine, ema: EMATeacher, run_dir: Path) -> TrainState:
    """Load the newest usable checkpoint of `run_dir` (older ones if it fails), or start fresh."""
    for folder in checkpoints.candidates(run_dir):
        try:
            engine.load(folder)
            ema.load(folder / "ema.safetensors")
        except Exception as err:  # a corrupt file: say which, fall back to the previous checkpoint
            tqdm.write(f"refusing checkpoint {folder}: {type(err).__name__}: {err}")
            continue
        state = TrainState(**checkpoints.read_state(folder))
        tqdm.write(f"resumed from {folder} at step {state.step}")
        return state
    return TrainState()


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
