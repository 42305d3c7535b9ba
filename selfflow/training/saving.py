"""Saving and resuming a run, decided by every rank together (the file handling is `checkpoints.py`).

    save(job)          every rank writes its part, files are hashed across ranks, rank 0 seals
    resume(job)        the newest checkpoint every rank can use (converted for another number of
                       processes when it was saved by one), or a fresh state; an error if none is usable
    start_over(job)    `resume=false`: the earlier run's checkpoints go to run_dir/previous/

A write error or an unusable checkpoint on any rank is seen by all ranks, which stop (or move on to
an older checkpoint) together; nothing is deleted but checkpoints pruned by `keep_checkpoints` and the
temporary universal copy (README "What happens when things go wrong").
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open
from tqdm import tqdm

from selfflow.config import save_config
from selfflow.faults import fault_point
from selfflow.training import checkpoints
from selfflow.training.checkpoints import CheckpointError
from selfflow.training.engine import all_gather, barrier, broadcast, to_universal, write_error
from selfflow.training.steplog import truncate_jsonl

if TYPE_CHECKING:
    from selfflow.training.run import Run


@dataclass
class TrainState:
    """Everything a checkpoint holds besides model, optimizer and EMA weights (`state.json`)."""

    step: int = 0  # optimizer steps done
    run_id: str | None = None  # MLflow run continued on resume
    run_uid: str = ""  # this run's id in checkpoint manifests: pruning never touches another run's
    skipped: int = 0  # non-finite steps skipped
    data_position: dict[str, int] = field(default_factory=dict)  # batches each stream delivered


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
