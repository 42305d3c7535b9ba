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
- Checkpoints are sealed by a manifest of every file's size and sha256 (`checkpoints.py`); on
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
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from selfflow.config import save_config
from selfflow.data.batch import mix_seed
from selfflow.faults import fault_point
from selfflow.files import atomic_write
from selfflow.progress import progress
from selfflow.training import checkpoints
from selfflow.training.checkpoints import CheckpointError
from selfflow.training.engine import (
    DeepSpeedConfig,
    DistInfo,
    EMATeacher,
    Engine,
    all_gather,
    barrier,
    broadcast,
    fresh_copy,
    init_distributed,
    max_over_ranks,
    shutdown,
    to_universal,
    write_error,
)
from selfflow.training.objective import LossTerms
from selfflow.training.schedules import EMAConfig, LRConfig, ema_decay, lr_at
from selfflow.training.steplog import LogWindow, append_jsonl, truncate_jsonl
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


@dataclass
class TrainState:
    """Everything a checkpoint holds besides model, optimizer and EMA weights (`state.json`)."""

    step: int = 0  # optimizer steps done
    run_id: str | None = None  # MLflow run continued on resume
    run_uid: str = ""  # this run's id in checkpoint manifests: pruning never touches another run's
    skipped: int = 0  # non-finite steps skipped
    data_position: dict[str, int] = field(default_factory=dict)  # batches each stream delivered


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
    sums = {"loss": 0.0, "fm": 0.0, "rep": 0.0, "samples": 0, "tokens": 0}
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


# --------------------------------------------------------------------------------------------
# Checkpoints


def save(job: Run) -> Path:
    """Every rank writes its part; the files are hashed (split across ranks) and rank 0 seals the
    folder with the manifest, moves `latest` and prunes. A write error anywhere stops every rank
    with the error before anything is sealed or pruned."""
    cfg, info, state = job.cfg, job.info, job.state
    folder = checkpoints.checkpoint_dir(job.run_dir, state.step)
    problem = None
    if info.rank == 0 and folder.exists():  # never written into: an unsealed leftover goes aside first
        try:
            checkpoints.move_aside(folder, "an unsealed folder in the way of a new save")
        except OSError as err:
            problem = write_error(folder, err)
    problem = broadcast(problem)
    if problem:
        raise CheckpointError(f"could not make room for checkpoint {folder}: {problem}")
    errors = job.engine.save(folder, client_state={"step": state.step})
    fault_point("save.after_engine", state.step)
    errors += job.ema.save(folder / "ema.safetensors")
    if info.rank == 0:
        try:
            checkpoints.write_state(folder, asdict(state))
            save_config(cfg, folder / "config.yaml")
        except OSError as err:
            errors.append(write_error(folder / "state.json", err))
    listing = None
    if info.rank == 0:
        try:
            listing = sorted(p.name for p in folder.iterdir() if p.is_file())
        except OSError as err:
            listing = []
            errors.append(write_error(folder / "*", err))
    names = broadcast(listing)
    hashes = {}
    for name in names[info.rank :: info.world]:
        try:
            hashes[name] = checkpoints.hash_file(folder / name)
        except OSError as err:
            errors.append(write_error(folder / name, err))
    gathered = all_gather((errors, hashes))
    failures = [e for errs, _ in gathered for e in errs]
    if failures:
        raise CheckpointError(
            f"could not write checkpoint {folder}: {'; '.join(failures)}. It stays unsealed (a later resume "
            "moves it aside); the earlier checkpoints are untouched: free space and run the same command to resume"
        )
    fault_point("save.before_seal", state.step)
    failure = None
    if info.rank == 0:
        files = {name: digest for _, part in gathered for name, digest in part.items()}
        meta = {"step": state.step, "world_size": info.world, "zero_stage": cfg.deepspeed.zero_stage}
        try:
            checkpoints.write_manifest(folder, files, {**meta, "run_uid": state.run_uid})
            fault_point("save.after_seal", state.step)
            checkpoints.set_latest(job.run_dir, folder)
        except OSError as err:
            failure = write_error(folder / checkpoints.MANIFEST, err)
        try:
            if failure is None:
                checkpoints.prune(job.run_dir, cfg.keep_checkpoints, state.run_uid)
        except OSError as err:  # the new checkpoint is sealed; an old one that stays is no failure
            tqdm.write(f"warning: could not prune old checkpoints: {err}")
    failure = broadcast(failure)
    if failure:
        raise CheckpointError(f"could not seal checkpoint {folder}: {failure}; the earlier checkpoints are untouched")
    if job.tracker is not None:
        job.tracker.log_artifact(folder / "state.json", "checkpoints/" + folder.name)
    return folder


def start_over(job: Run) -> TrainState:
    """`resume=false`: an earlier run's checkpoints, metrics and evaluations go to run_dir/previous/."""
    if job.info.rank == 0:
        moved = checkpoints.move_run_aside(job.run_dir)
        if moved is not None:
            tqdm.write(f"resume=false: moved the earlier run's checkpoints and metrics to {moved}")
    barrier()
    return TrainState(run_uid=broadcast(uuid.uuid4().hex))


def resume(job: Run) -> TrainState:
    """The newest checkpoint every rank can use, loaded on every rank; a fresh state if there is none.

    Raises `CheckpointError` (on every rank) when checkpoints exist but none can be used.
    """
    info = job.info
    names = broadcast([p.name for p in checkpoints.step_folders(job.run_dir)] if info.rank == 0 else None)
    refused: dict[str, str] = {}
    for name in names:
        folder = checkpoints.checkpoint_root(job.run_dir) / name
        reasons = all_gather(usable(job, folder))
        manifest = checkpoints.read_manifest(folder) if info.rank == 0 and not any(reasons) else {}
        saved_world = broadcast(manifest.get("world_size", info.world))
        source, failure = folder, None
        if not any(reasons) and saved_world != info.world and job.cfg.deepspeed.zero_stage > 0:
            source, failure = universal_copy(job, folder)  # collective: every rank gets rank 0's outcome
            reasons = [failure] if failure else reasons
        if not any(reasons):
            try:
                state, failure = load(job, folder, source), None
            except Exception as err:
                state, failure = None, f"{type(err).__name__}: {err}"
            reasons = all_gather(failure)  # also: every rank is done reading `source`
        if source != folder and info.rank == 0:
            shutil.rmtree(source, ignore_errors=True)  # derived from the checkpoint, which stays
        if any(reasons):
            refused[name] = join_reasons(reasons)
            if info.rank == 0:
                tqdm.write(f"refusing checkpoint {folder}: {refused[name]}")
            continue
        barrier()
        if info.rank == 0:
            moved = (
                f" (saved by {saved_world} processes, continued by {info.world})" if saved_world != info.world else ""
            )
            tqdm.write(f"resumed from {folder} at step {state.step}{moved}")
            settle(job, folder, state, refused)
        barrier()
        return state
    if refused:
        listing = "\n".join(f"  {name}: {why}" for name, why in refused.items())
        raise CheckpointError(
            f"{checkpoints.checkpoint_root(job.run_dir)} holds checkpoints, none of which can be resumed:\n{listing}\n"
            "Nothing was changed. To start over, use a new run_dir, or resume=false (which moves these "
            f"checkpoints to {job.run_dir / 'previous'}/)."
        )
    if info.rank == 0:
        truncate_jsonl(job.run_dir / "metrics.jsonl", 0)  # rows of a run that never saved a checkpoint
    return TrainState(run_uid=broadcast(uuid.uuid4().hex))


def usable(job: Run, folder: Path) -> str | None:
    """Why this rank cannot resume from `folder` (None: it can): files, ZeRO stage, shapes."""
    try:
        manifest = checkpoints.verify(folder, job.info.rank)
    except (ValueError, OSError) as err:
        return str(err)
    if manifest.get("zero_stage") != job.cfg.deepspeed.zero_stage:
        return f"saved with ZeRO stage {manifest.get('zero_stage')}, this job uses {job.cfg.deepspeed.zero_stage}"
    return shape_mismatch(folder / "ema.safetensors", job.engine.param_shapes())


def shape_mismatch(path: Path, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """How the weights in `path` (read from the safetensors header only) differ from the model's."""
    with safe_open(str(path), framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    missing, unexpected = sorted(set(shapes) - set(saved)), sorted(set(saved) - set(shapes))
    if missing or unexpected:
        lacks = f"lacks {len(missing)} of the model's parameters ({', '.join(missing[:3]) or '-'})"
        extra = f"has {len(unexpected)} the model lacks ({', '.join(unexpected[:3]) or '-'})"
        return f"{path.name} {lacks} and {extra} (a changed model config?)"
    for name, shape in shapes.items():
        if saved[name] != shape:
            return f"{path.name}: {name} is {saved[name]}, the model's is {shape} (a changed model config?)"
    return None


def universal_copy(job: Run, folder: Path) -> tuple[Path, str | None]:
    """Rank 0 checks every rank's files of `folder` and converts it to DeepSpeed's universal
    checkpoint under `checkpoints/universal/`; returns its path and, on every rank, why that failed."""
    target = checkpoints.checkpoint_root(job.run_dir) / "universal" / folder.name
    failure = None
    if job.info.rank == 0:
        saved = checkpoints.read_manifest(folder)["world_size"]
        tqdm.write(f"{folder} was saved by {saved} processes: converting it for {job.info.world} -> {target}")
        try:
            checkpoints.verify(folder)  # the files of every saving rank, not only rank 0's own
            if target.exists():  # a conversion that did not finish
                shutil.rmtree(target)
            to_universal(folder, target)
        except Exception as err:
            failure = f"could not convert it for {job.info.world} processes: {type(err).__name__}: {err}"
    return target, broadcast(failure)


def load(job: Run, folder: Path, source: Path) -> TrainState:
    """Model and optimizer from `source` (`folder` itself, or its universal copy), EMA and state from `folder`."""
    job.engine.load(source, universal=source != folder)
    job.ema.load(folder / "ema.safetensors")
    saved = checkpoints.read_state(folder)
    known = {f.name for f in fields(TrainState)}
    state = TrainState(**{k: v for k, v in saved.items() if k in known})
    if not state.run_uid:
        state.run_uid = checkpoints.read_manifest(folder).get("run_uid") or uuid.uuid4().hex
    return state


def settle(job: Run, folder: Path, state: TrainState, refused: dict[str, str]) -> None:
    """After a resume (rank 0): newer refused checkpoints go aside, `latest` names the one resumed
    from, and metrics.jsonl keeps the rows up to its step."""
    for name, why in refused.items():
        if name > folder.name:
            moved = checkpoints.move_aside(folder.parent / name, why)
            tqdm.write(f"moved the refused {name} to {moved}")
    checkpoints.set_latest(job.run_dir, folder)
    truncate_jsonl(job.run_dir / "metrics.jsonl", state.step)


def join_reasons(reasons: list[str | None]) -> str:
    if len(reasons) == 1:
        return reasons[0]
    return "; ".join(f"rank {rank}: {why}" for rank, why in enumerate(reasons) if why)
