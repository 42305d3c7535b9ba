"""The run layer: one loop for pretraining (`train.py`) and robotics finetuning (`robotics/finetune.py`).

A job gives `run(cfg, task, callbacks)` its config (a `RunConfig` subclass), a `Task` (the model,
the batch source and the loss of one micro-batch) and periodic callbacks (evaluation). The loop
owns what every run needs: processes, the DeepSpeed engine and the EMA teacher, the learning-rate
and EMA schedules, the collective finiteness check, `metrics.jsonl`, MLflow, and checkpoints with
the rules below.

One optimizer step: the learning rate of the step is set (a pure function of the step), then
`grad_accum` micro-batches (the task draws all of them from the same modality: the paper draws one
modality per optimizer step) each give a loss, which is checked on every rank together before
backward; after the last one the optimizer steps (DeepSpeed leaves the weights alone when a
gradient is not finite) and the EMA is updated once. Every random draw comes from a generator
seeded by `(seed, step, micro, rank)`, so a resumed run repeats the uninterrupted one bit for bit.

Rules (README "What happens when things go wrong"):
- Checkpoints are sealed by a manifest of every file's size and sha256 (`checkpoints.py`; saving and
  resuming are `saving.py`); on
  resume every rank verifies the files it will read and checks the model's shapes, and all ranks
  take the newest checkpoint that every rank can use, or stop together with an error naming
  each checkpoint and why it was refused. A run folder with checkpoints never starts over
  silently: `resume=false` moves the old run aside first. Checkpoints newer than the one resumed
  from are moved to `checkpoints/refused/`, never deleted or overwritten.
- A failure on one rank (bad data, a non-finite loss or gradient, a write error, a failing
  callback) is seen by every rank at the same point, and all stop with the same message.
- `nan_policy=skip` skips a step whose loss or gradient is not finite (the weights and EMA stay
  as they were) and stops after `max_skips_in_a_row` such steps in a row.
- DeepSpeed files are unpickled only after their sha256 matched, and then only by the
  weights-only unpickler (`engine.restricted_unpickling`).
- A checkpoint saved by another number of processes (ZeRO 1-3) is converted once by rank 0 to
  DeepSpeed's universal format (`checkpoints/universal/<step>`, removed after the load) and every
  rank takes its partitions of weights and Adam moments from it; ZeRO-0 files are whole and load
  as they are. Each rank's data streams and noise follow its new rank (README "Resume at another
  world size").
"""

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn
from tqdm import tqdm

from selfflow.config import save_config
from selfflow.data.batch import mix_seed
from selfflow.faults import fault_point
from selfflow.files import atomic_write
from selfflow.progress import progress
from selfflow.training.engine import (
    DeepSpeedConfig,
    DistInfo,
    EMATeacher,
    Engine,
    all_gather,
    fresh_copy,
    init_distributed,
    max_over_ranks,
    shutdown,
)
from selfflow.training.objective import LossTerms
from selfflow.training.saving import TrainState, resume, save, start_over
from selfflow.training.schedules import EMAConfig, LRConfig, ema_decay, lr_at
from selfflow.training.steplog import LogWindow, append_jsonl
from selfflow.training.tracking import Tracker, TrackingConfig

NAN_POLICIES = ("stop", "skip")


@dataclass
class RunConfig:
    """What every run has, pretraining or finetuning. Jobs extend it with their model and data."""

    run_dir: str = "runs/selfflow"
    steps: int = 1000  # optimizer steps in total (a resumed run continues to this count)
    seed: int = 0
    log_every: int = 10  # MLflow logging period; metrics.jsonl gets every step
    save_every: int = 500
    keep_checkpoints: int = 3  # newest sealed checkpoints of this run kept; older ones are deleted
    resume: bool = True  # False: move an earlier run's checkpoints aside (run_dir/previous/) and start over
    nan_policy: str = "stop"  # "stop": raise naming step, data and term; "skip": skip the step and count it
    max_skips_in_a_row: int = 5  # nan_policy=skip stops after this many non-finite steps in a row
    compile: bool = False  # torch.compile every trunk block of student and teacher (ZeRO 0-2)
    # torch threads per process; 0: this machine's cores (its CPU affinity) divided by the processes of this
    # node (LOCAL_WORLD_SIZE). torch's own default takes every core in every process, which oversubscribes
    # the cores under torchrun or beside another job (measured: 1-8 s a step instead of 0.55 s).
    threads: int = 0
    lr: LRConfig = field(default_factory=LRConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        if self.nan_policy == "skip" and self.deepspeed.grad_accum != 1:
            raise ValueError("nan_policy 'skip' needs deepspeed.grad_accum = 1 (a skipped step drops one micro-batch)")
        if min(self.steps, self.save_every, self.keep_checkpoints, self.log_every, self.max_skips_in_a_row) < 1:
            raise ValueError("steps, save_every, keep_checkpoints, log_every and max_skips_in_a_row must be >= 1")
        if self.compile and self.deepspeed.zero_stage == 3:
            raise ValueError("compile is supported with deepspeed.zero_stage 0-2 (ZeRO-3 gathers inside blocks)")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


class RunError(RuntimeError):
    """A run stopped: every rank raises it with the same message."""


class NonFiniteLossError(RunError, FloatingPointError):
    """A loss term or the gradient became NaN or inf (the message names the step, the data and the term)."""


class StepOutput(NamedTuple):
    terms: LossTerms
    name: str  # what the micro-batch was ("image", "clips"): the `loss/<name>` metric and messages
    samples: int
    tokens: int
    kind: str = "modality"  # messages say "<kind> <name>"
    data_time: float = 0.0  # seconds the step waited for this micro-batch (host side: read, decode, collate)


class Models:
    """What a task's loss sees: the student (DeepSpeed's module) and the EMA teacher."""

    def __init__(self, engine: Engine, ema: EMATeacher, device: torch.device):
        self.engine, self.ema, self.device = engine, ema, device
        self.student: nn.Module = engine.module
        self.dtype = engine.dtype

    @contextmanager
    def teacher(self) -> Iterator[nn.Module]:
        """The EMA teacher for a forward pass, under the student's autocast (bf16 on GPUs)."""
        bf16 = self.dtype == torch.bfloat16 and self.device.type == "cuda"
        autocast = torch.autocast(self.device.type, torch.bfloat16) if bf16 else nullcontext()
        with self.ema.gathered() as model, autocast:
            yield model


class Task(Protocol):
    """What a job gives the loop."""

    micro_batch: int  # the largest micro-batch (DeepSpeed's config)

    def build_model(self) -> nn.Module:
        """The initial model, the same on every rank (the loop seeds torch with `seed` first)."""

    def open_data(self, rank: int, world: int, positions: dict[str, int]) -> None:
        """Open the batch streams of rank `rank` of `world` at the saved positions."""

    def positions(self) -> dict[str, int]:
        """The streams' positions, saved in every checkpoint."""

    def loss(self, models: Models, step: int, micro: int, generator: torch.Generator) -> StepOutput:
        """The loss of micro-batch `micro` of optimizer step `step` (0-based)."""


@dataclass
class Run:
    """A running job, as callbacks see it."""

    cfg: RunConfig
    info: DistInfo
    run_dir: Path
    engine: Engine
    ema: EMATeacher
    task: Task
    state: TrainState
    tracker: Tracker | None = None
    skips_in_a_row: int = 0


@dataclass
class Periodic:
    """`fn(run, step)` on every rank after every `every`-th step and after the last one."""

    every: int
    fn: Callable[[Run, int], None]
    name: str = "callback"


def run(cfg: RunConfig, task: Task, callbacks: Sequence[Periodic] = ()) -> Path:
    """Train to `cfg.steps` optimizer steps; returns the run folder. The task checked its inputs already."""
    run_dir = Path(cfg.run_dir)
    info = init_distributed()
    job: Run | None = None
    status = "FAILED"
    try:
        job = setup(cfg, task, info, run_dir)
        begin(job)
        loop(job, callbacks)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if job is not None and job.tracker is not None:
            job.tracker.close(status)
        shutdown()
    return run_dir


def threads_per_process(threads: int) -> int:
    """`threads`, or (0) the cores this process may use divided by the processes on this node."""
    if threads:
        return threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, len(os.sched_getaffinity(0)) // max(1, local))


def setup(cfg: RunConfig, task: Task, info: DistInfo, run_dir: Path) -> Run:
    torch.set_num_threads(threads_per_process(cfg.threads))
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = task.build_model()
    if info.rank == 0:
        params = sum(p.numel() for p in model.parameters())
        tqdm.write(f"model parameters: {params:,}; torch threads per process: {torch.get_num_threads()}")
    teacher_init = fresh_copy(model)
    engine = Engine.create(model, cfg.deepspeed, task.micro_batch, info.device, lr=cfg.lr.peak)
    ema = EMATeacher.create(engine, teacher_init)
    if cfg.compile:  # block by block: one graph per block kind and token count, DeepSpeed stays eager
        for trunk in (engine.module, ema.teacher):
            trunk.compile_blocks()
    job = Run(cfg, info, run_dir, engine, ema, task, TrainState())
    job.state = resume(job) if cfg.resume else start_over(job)
    fault_point("resume.after_load", job.state.step)
    # The tracker starts here, so that anything failing from now on ends its MLflow run as FAILED.
    link = run_dir / "mlflow_run.json"
    recorded = read_link(link) if job.state.run_id is not None and info.rank == 0 else None
    job.tracker = Tracker(cfg.tracking, run_dir, info.rank, run_id=job.state.run_id, recorded_uri=recorded)
    job.state.run_id = job.tracker.run_id
    if info.rank == 0 and job.tracker.run_id is not None:  # lets `selfflow report` attach files to this run
        atomic_write(link, json.dumps({"tracking_uri": job.tracker.uri, "run_id": job.state.run_id}))
    return job


def read_link(path: Path) -> str | None:
    """The tracking URI the run folder's MLflow run lives in, if the folder records one."""
    try:
        return str(json.loads(path.read_text())["tracking_uri"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def begin(job: Run) -> None:
    """What comes after the tracker started: open the data, keep the config, log it."""
    cfg, info = job.cfg, job.info
    together("opening the data", lambda: job.task.open_data(info.rank, info.world, job.state.data_position))
    if info.rank == 0:
        save_config(cfg, job.run_dir / "config.yaml")
    job.tracker.log_params(cfg)
    job.tracker.log_artifact(job.run_dir / "config.yaml")


def loop(job: Run, callbacks: Sequence[Periodic]) -> None:
    cfg, info, state = job.cfg, job.info, job.state
    models = Models(job.engine, job.ema, info.device)
    bar = progress(range(state.step, cfg.steps), initial=state.step, total=cfg.steps, disable=info.rank != 0)
    window = LogWindow()
    for step in bar:
        start = time.perf_counter()
        metrics = optimizer_step(job, models, step)
        metrics["step_time"] = time.perf_counter() - start
        metrics["samples_per_s"] = metrics.pop("samples") * info.world / metrics["step_time"]
        metrics["tokens_per_s"] = metrics.pop("tokens") * info.world / metrics["step_time"]
        state.step, state.data_position = step + 1, job.task.positions()
        fault_point("step.after_optimizer", state.step)
        if info.rank == 0:
            append_jsonl(job.run_dir / "metrics.jsonl", {"step": state.step, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", fm=f"{metrics['fm']:.4f}", rep=f"{metrics['rep']:.3f}")
        fault_point("step.after_metrics", state.step)
        window.add(metrics)
        if state.step % cfg.log_every == 0:
            job.tracker.log_metrics(window.flush(), state.step)
        if state.step % cfg.save_every == 0 or state.step == cfg.steps:
            save(job)
        for callback in callbacks:
            if state.step % callback.every == 0 or state.step == cfg.steps:
                together(f"{callback.name} at step {state.step}", lambda cb=callback: cb.fn(job, state.step))


# --------------------------------------------------------------------------------------------
# One optimizer step

OK, NON_FINITE, FAILED = 0, 1, 2


def optimizer_step(job: Run, models: Models, step: int) -> dict:
    """`grad_accum` micro-batches, the optimizer step and the EMA update; the step's metrics."""
    cfg, engine = job.cfg, job.engine
    engine.set_lr(lr_at(cfg.lr, step, cfg.steps))
    ga = cfg.deepspeed.grad_accum
    sums = {"loss": 0.0, "fm": 0.0, "rep": 0.0, "samples": 0, "tokens": 0, "data_time": 0.0}
    per_name: dict[str, float] = {}
    for micro in range(ga):
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, step, micro, job.info.rank))
        out, failure, bad = None, None, None
        try:
            out = job.task.loss(models, step, micro, gen)
            bad = non_finite(out.terms)
        except Exception as err:  # decided below by every rank together
            failure = err
        code = max_over_ranks(FAILED if failure else NON_FINITE if bad else OK)
        if code == FAILED:
            raise_together(f"step {step + 1}", failure)
        if code == NON_FINITE:
            engine.abandon_forward()
            where = f"{out.kind} {out.name}" if out is not None else "?"
            return skip_step(job, step, f"{where}: loss term {bad or 'on another rank'}")
        engine.backward(out.terms.total)  # DeepSpeed divides by grad_accum itself
        applied = engine.step()
        for key in ("loss", "fm", "rep"):
            sums[key] += getattr(out.terms, "total" if key == "loss" else key).item() / ga
        sums["samples"] += out.samples
        sums["tokens"] += out.tokens
        sums["data_time"] += out.data_time
        per_name[f"loss/{out.name}"] = out.terms.total.item()
    if not applied:
        return skip_step(job, step, f"{out.kind} {out.name}: the gradient")
    job.ema.update(ema_decay(cfg.ema, step))
    job.skips_in_a_row = 0
    grad_norm = engine.grad_norm
    return {**sums, **per_name, "lr": engine.lr, "grad_norm": grad_norm, "skipped": job.state.skipped}


def non_finite(terms: LossTerms) -> str | None:
    """The first loss term that is NaN or inf, or None."""
    for name in ("fm", "rep", "total"):
        if not torch.isfinite(getattr(terms, name)).all():
            return name
    return None


def skip_step(job: Run, step: int, what: str) -> dict:
    """A step whose loss or gradient is not finite (the same on every rank): stop, or skip and count it."""
    where = f"step {step + 1}, {what} is not finite"
    if job.cfg.nan_policy == "stop":
        raise NonFiniteLossError(f"{where}; stopping (the last complete checkpoint is kept)")
    job.state.skipped += 1
    job.skips_in_a_row += 1
    if job.skips_in_a_row >= job.cfg.max_skips_in_a_row:
        raise NonFiniteLossError(
            f"{where}; {job.skips_in_a_row} steps in a row were not finite (max_skips_in_a_row): the run has "
            "diverged; stopping (the last complete checkpoint is kept; resume it with a lower lr.peak)"
        )
    if job.info.rank == 0:
        tqdm.write(f"skipping {where} ({job.state.skipped} skipped so far)")
    nan = math.nan
    lr, skipped = job.engine.lr, job.state.skipped
    return {"loss": nan, "fm": nan, "rep": nan, "samples": 0, "tokens": 0, "lr": lr, "skipped": skipped}


def together(what: str, fn: Callable[[], object]) -> object:
    """Run `fn` on every rank; if it raised on any rank, raise on every rank (never leave one waiting)."""
    try:
        result, failure = fn(), None
    except Exception as err:
        result, failure = None, err
    if max_over_ranks(FAILED if failure else OK) == FAILED:
        raise_together(what, failure)
    return result


def raise_together(what: str, failure: BaseException | None) -> None:
    """Collect every rank's failure and raise one message naming the ranks (collective)."""
    messages = all_gather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if len(messages) == 1 and failure is not None:
        raise failure  # one process: its own error as it is
    text = "; ".join(f"rank {rank}: {m}" for rank, m in enumerate(messages) if m)
    raise RunError(f"{what} failed: {text}") from failure
