"""The one file that knows DeepSpeed (and training's only torch.distributed user): processes, collectives,
the engine, the EMA, conversion of a checkpoint for another number of processes (`to_universal`).

Everything ZeRO-specific lives here (stages, partitioned parameters, gathering, how DeepSpeed
writes and reads its checkpoint files); the run loop (`run.py`) sees an `Engine` with
`backward`, `step`, `set_lr`, `save`, `load` and an `EMATeacher` with `update`, `gathered`,
`save`, `load`, plus a few collectives (`all_gather`, `broadcast`, `barrier`).

EMA teacher (fp32, DESIGN.md section 2):
- ZeRO 0-2: a replicated fp32 copy of the model, updated from the (full) student weights.
- ZeRO-3: a partitioned fp32 copy. Its shards are flat buffers laid out exactly like the
  optimizer's fp32 master partitions, so the update is one fused `lerp_` per parameter group
  from this rank's master shard, with no communication. The teacher module's partitions are
  views of those buffers, so gathering it for the forward reads the EMA (gathered copies are
  read-only: writes through them would be discarded).

Checkpoint files: DeepSpeed pickles its model and optimizer states with `torch.save`. Reading
them goes through `restricted_unpickling()`: torch's weights-only unpickler (forced even where
DeepSpeed asks torch for a full unpickler) that admits tensors, containers and the three small
DeepSpeed classes those files hold, so no file can run code. Writing goes through Python file
objects, so a full disk is an `OSError` "No space left on device" with the path; write errors
are collected per rank instead of raised inside DeepSpeed's save (a rank raising there would
leave the others waiting in DeepSpeed's barrier), and the run loop decides on them together.

    engine = Engine.create(model, ds_cfg, micro_batch=38, device=info.device, lr=1e-4)
    ema = EMATeacher.create(engine, model_copy)
    engine.set_lr(lr); loss = ...; engine.backward(loss); applied = engine.step(); ema.update(decay)
"""

import copy
import functools
import math
import os
import pickle
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from selfflow.backbone.checkpoint import unpickling_reason
from selfflow.ranks import launcher_env


@dataclass
class DeepSpeedConfig:
    """Optimizer and ZeRO settings. AdamW with betas (0.9, 0.999), eps 1e-8, no weight decay and
    clipping at 1.0 are SiT's and REPA's settings (their `train.py`); the learning rate and its
    schedule are the run's `lr` section (`schedules.LRConfig`)."""

    zero_stage: int = 2  # 0-3
    bf16: bool = True  # bf16 weights/activations with fp32 master weights and fp32 gradient accumulation
    grad_clip: float = 1.0  # 0: off
    grad_accum: int = 1  # micro-batches per optimizer step (all of one modality; see run.py)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.bf16 and self.zero_stage == 0:  # DeepSpeed: "unsupported mix of bf16 and grad_accum_dtype fp32"
            raise ValueError("bf16 needs zero_stage 1-3 (DeepSpeed accumulates bf16 gradients in fp32 only with ZeRO)")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")


def ds_config_dict(cfg: DeepSpeedConfig, micro_batch: int, lr: float = 1e-4) -> dict:
    """The DeepSpeed JSON config for `cfg` (AdamW, ZeRO stage, bf16, clipping; no DeepSpeed scheduler:
    the run loop sets the learning rate of every step from its own pure schedule)."""
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": cfg.betas,
                "eps": cfg.eps,
                "weight_decay": cfg.weight_decay,
                # torch's multi-tensor AdamW: DeepSpeed's fused (GPU) and CPU Adam ops need a
                # C++/CUDA build at start-up, which a fresh node would pay on every job.
                "torch_adam": True,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if cfg.zero_stage == 3:
        config["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    return config


# --------------------------------------------------------------------------------------------
# Processes and collectives


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device


_ADDED_ENV: set[str] = set()  # variables init_distributed put into os.environ


def init_distributed() -> DistInfo:
    """Join (or, alone, create) the process group: NCCL on GPUs, gloo on CPUs.

    Works under `torchrun`, the `deepspeed` launcher and SLURM (`srun` exports the env that
    torchrun would), and as a single plain process.
    """
    env = os.environ
    before = set(env)
    env.update(launcher_env())
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(verbose=False)
    # forgotten again by `shutdown`, so a later job (or child process) of this process starts clean
    _ADDED_ENV.update(set(env) - before)
    local = int(env.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_over_ranks(value: int) -> int:
    """The largest `value` of all ranks, on every rank (one small all-reduce)."""
    t = torch.tensor([float(value)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (so all ranks take the same branch)."""
    return max_over_ranks(int(flag)) > 0


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (small, picklable: strings, numbers, dicts of them), in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    # DeepSpeed caches process groups of the destroyed world; a later job in this process needs fresh ones
    groups = sys.modules.get("deepspeed.utils.groups")  # only if a job imported DeepSpeed
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if groups is not None:
            setattr(groups, name, None)
    for name in _ADDED_ENV:
        os.environ.pop(name, None)
    _ADDED_ENV.clear()


# --------------------------------------------------------------------------------------------
# Checkpoint files


def deepspeed_globals() -> list:
    """What DeepSpeed's model/optimizer files hold besides tensors and containers (found by loading
    files of every ZeRO stage with fp32 and bf16 through the weights-only unpickler)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def restricted_unpickling() -> Iterator[None]:
    """Every `torch.load` inside (DeepSpeed's included) uses the weights-only unpickler."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # wins over a caller's request for full unpickling
    # only the classes not admitted yet: leaving a nested use (DeepSpeed's file reads inside a load)
    # must not take back what the outer one admitted
    admitted = set(torch.serialization.get_safe_globals())
    try:
        with torch.serialization.safe_globals([g for g in deepspeed_globals() if g not in admitted]):
            yield
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to unpickle a checkpoint file: {unpickling_reason(err)}") from err
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def write_error(path: str | Path, err: BaseException) -> str:
    """A write failure as one line naming the file (ENOSPC says so plainly, with the free space)."""
    text = f"{type(err).__name__}: {err}"
    try:
        free = os.statvfs(Path(path).parent).f_bavail * os.statvfs(Path(path).parent).f_frsize
    except OSError:
        free = None
    if "No space left" in text or "os error 28" in text or (free is not None and free < 1 << 20):
        text = f"No space left on device ({free} bytes free)" if free is not None else "No space left on device"
    return f"{path}: {text}"


@functools.cache
def checkpoint_files_class() -> type:
    """DeepSpeed's torch checkpoint engine with Python-file writes that record errors, and safe reads
    (a class made on first use: DeepSpeed is imported only when a job runs)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class CheckpointFiles(TorchCheckpointEngine):
        def __init__(self, config_params):
            super().__init__(config_params)
            self.errors: list[str] = []

        def save(self, state_dict, path: str):
            try:
                with open(path, "wb") as f:
                    torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
            except (OSError, RuntimeError) as err:
                self.errors.append(write_error(path, err))

        def load(self, path: str, map_location=None):
            with restricted_unpickling():
                return torch.load(path, map_location=map_location, weights_only=True)

    return CheckpointFiles


# --------------------------------------------------------------------------------------------
# Engine


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights); never decay vectors (norm scales, biases) or embedding tables."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            matrix = isinstance(module, nn.Linear) and name == "weight"
            (decay if matrix else no_decay).append(p)
    covered = {id(p) for p in decay + no_decay}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert covered == trainable and len(decay) + len(no_decay) == len(trainable), "param groups must cover once"
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _UnusedModules:
    """ZeRO-3 keeps a stale gradient for a parameter that took part in an earlier step but not in this
    one (a modality's projections on another modality's step; without this, ZeRO-3 diverges from
    ZeRO-2 on mixed-modality runs). Forward pre-hooks record which parameter-owning modules ran and
    the shapes they took; `zero()` is a loss term equal to 0 that runs every module that sat out
    this step on zeros of those shapes (leading dimensions cut to 1), so each gets an exact zero
    gradient. Modules that never ran have no gradient to go stale and are left alone."""

    def __init__(self, model: nn.Module):
        self.modules = {n: m for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
        self.ran: set[str] = set()
        self.inputs: dict[str, list[tuple[torch.Size, torch.dtype]] | None] = {}
        for name, module in self.modules.items():
            module.register_forward_pre_hook(partial(self._record, name), with_kwargs=True)

    def _record(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.ran.add(name)
        if name not in self.inputs:
            tensors = not kwargs and args and all(isinstance(a, Tensor) for a in args)
            self.inputs[name] = [(a.shape, a.dtype) for a in args] if tensors else None

    def zero(self, like: Tensor) -> Tensor:
        zero = like.new_zeros(())
        for name in [n for n in self.inputs if n not in self.ran]:
            if self.inputs[name] is None:
                raise RuntimeError(f"ZeRO-3: module {name} sat out a step and takes inputs other than tensors")
            args = [
                torch.zeros((1,) * (len(shape) - 1) + shape[-1:], dtype=dtype, device=like.device)
                if dtype.is_floating_point
                else torch.zeros((1,) * len(shape), dtype=dtype, device=like.device)
                for shape, dtype in self.inputs[name]
            ]
            out = self.modules[name](*args)
            for part in out if isinstance(out, tuple) else (out,):
                zero = zero + part.float().sum()
        self.ran.clear()
        return zero * 0.0


class Engine:
    """A DeepSpeed engine plus the facts the loop needs (stage, dtype)."""

    def __init__(self, ds_engine, cfg: DeepSpeedConfig):
        self.ds, self.cfg = ds_engine, cfg
        self.module: nn.Module = ds_engine.module
        self.dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        files = ds_engine.checkpoint_engine
        if type(files) is not TorchCheckpointEngine:
            raise ValueError(f"unsupported DeepSpeed checkpoint engine {type(files).__name__}")
        self.files = checkpoint_files_class()(ds_engine._config)
        ds_engine.checkpoint_engine = self.files
        self.unused = _UnusedModules(self.module) if self.zero3 else None

    @classmethod
    def create(
        cls, model: nn.Module, cfg: DeepSpeedConfig, micro_batch: int, device: torch.device, lr: float = 1e-4
    ) -> "Engine":
        import deepspeed

        ds_cfg = ds_config_dict(cfg, micro_batch, lr)
        model = model.to(device)
        ds_engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), config=ds_cfg
        )
        return cls(ds_engine, cfg)

    @property
    def zero3(self) -> bool:
        return self.cfg.zero_stage == 3

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def abandon_forward(self) -> None:
        """A forward whose loss is not used (a skipped step): forget which modules it ran."""
        if self.unused is not None:
            self.unused.ran.clear()

    def backward(self, loss: Tensor) -> None:
        if self.unused is not None:
            loss = loss + self.unused.zero(loss)
        self.ds.backward(loss)

    def step(self) -> bool:
        """The optimizer step (at a gradient-accumulation boundary); False when it was not applied
        because a gradient is not finite (the weights are unchanged)."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        if boundary and self.cfg.zero_stage == 0 and not self._grads_finite():
            self.ds.zero_grad()  # DeepSpeed checks gradients itself under ZeRO 1-3, not at stage 0
            self.ds.skipped_steps += 1
            return False
        skipped = self.ds.skipped_steps
        self.ds.step()
        return not boundary or self.ds.skipped_steps == skipped

    def _grads_finite(self) -> bool:
        flags = [torch.isfinite(p.grad).all() for p in self.module.parameters() if p.grad is not None]
        return bool(torch.stack(flags).all()) if flags else True  # one host sync, not one per parameter

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    @property
    def grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full parameter shapes by name (ZeRO-3 keeps them beside the empty partitioned tensors)."""
        return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.module.named_parameters()}

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Full student weights readable inside (ZeRO-3 gathers them; other stages have them)."""
        ctx = gathered_parameters(self.module) if self.zero3 else nullcontext()
        with ctx:
            yield

    def save(self, folder: Path, client_state: dict) -> list[str]:
        """Model, optimizer of every rank into `folder` (collective); returns this rank's write errors."""
        self.files.errors = []
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, client_state=client_state, save_latest=False)
        return self.files.errors

    def load(self, folder: Path, universal: bool = False) -> None:
        """Model and optimizer from `folder` (collective; only after its files were verified).

        `universal`: `folder` is DeepSpeed's universal checkpoint (`to_universal`) of a checkpoint
        saved by another number of processes; each rank takes its partition of every parameter's
        fp32 weights and Adam moments from it."""
        config = self.ds._config
        config.load_universal_checkpoint = universal
        try:
            with restricted_unpickling():
                path, _ = self.ds.load_checkpoint(str(folder.parent), tag=folder.name, load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = False
        if path is None:
            raise ValueError(f"checkpoint {folder} could not be loaded by DeepSpeed")
        if universal:
            # DeepSpeed's ZeRO-3 universal load gives every flat parameter group one shared `step`
            # tensor, which torch's Adam increments in place once per group: the second group would
            # take its next step with the bias correction of step + 2. One tensor per group again.
            for state in self.ds.optimizer.optimizer.state.values():
                if isinstance(state.get("step"), Tensor):
                    state["step"] = state["step"].clone()


def to_universal(folder: Path, out: Path) -> None:
    """Write DeepSpeed's universal checkpoint of the ZeRO 1-3 checkpoint `folder` (saved by any number
    of processes) to `out`: every parameter's full fp32 weights and Adam moments, from which a job of
    any size takes its partitions. One process, no process group needed; files are read through
    the weights-only unpickler; DeepSpeed's own progress output is kept out of the job's log."""
    import argparse
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(folder),
        output_folder=str(out),
        num_extract_workers=1,  # in this process (DeepSpeed forks a pool for more)
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our checkpoints carry no Megatron-style universal-checkpoint info
    )
    with restricted_unpickling(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)


# --------------------------------------------------------------------------------------------
# EMA teacher


def gathered_parameters(module: nn.Module):
    """ZeRO-3: every parameter of `module` gathered whole inside the context."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    return GatheredParameters(list(module.parameters()))


class EMATeacher:
    """fp32 EMA of the student, kept as a model (`teacher`) that runs the teacher branch."""

    def __init__(self, engine: Engine, teacher: nn.Module):
        self.engine, self.teacher = engine, teacher
        self.teacher.requires_grad_(False).eval()
        student_names = {id(p): n for n, p in engine.module.named_parameters()}
        teacher_params = dict(self.teacher.named_parameters())
        if engine.zero3:
            opt = engine.ds.optimizer
            self.masters: list[Tensor] = opt.fp32_partitioned_groups_flat
            self.flats: list[Tensor] = []
            for group, master in zip(opt.fp16_groups, self.masters, strict=True):
                flat = torch.empty_like(master, dtype=torch.float32).detach()
                offset = 0
                for p in group:
                    tp = teacher_params[student_names[id(p)]]
                    n = tp.ds_tensor.numel()
                    flat.narrow(0, offset, n).copy_(tp.ds_tensor.data.float().flatten())
                    tp.ds_tensor.data = flat.narrow(0, offset, n)
                    offset += n
                self.flats.append(flat)
        else:
            self.students = list(engine.module.parameters())
            self.flats = [teacher_params[student_names[id(p)]].data for p in self.students]

    @classmethod
    def create(cls, engine: Engine, model_copy: nn.Module) -> "EMATeacher":
        """`model_copy`: an fp32 copy of the initial student (before DeepSpeed touched it)."""
        device = next(engine.module.parameters()).device
        teacher = model_copy.float().to(device)
        if engine.zero3:
            import deepspeed

            ds_cfg = ds_config_dict(engine.cfg, 1)
            deepspeed.zero.Init(module=teacher, config_dict_or_path=ds_cfg, dtype=torch.float32)
        return cls(engine, teacher)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """`ema <- decay * ema + (1 - decay) * student`, one fused op over all parameters."""
        if self.engine.zero3:
            sources = self.masters  # this rank's fp32 master shards: no communication
        else:
            sources = [p.detach().float() for p in self.students]
        torch._foreach_lerp_(self.flats, sources, 1.0 - decay)

    @contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """The teacher with full weights for a forward pass (read-only under ZeRO-3)."""
        ctx = gathered_parameters(self.teacher) if self.engine.zero3 else nullcontext()
        with ctx:
            yield self.teacher

    def state_dict(self) -> dict[str, Tensor]:
        """Full fp32 EMA weights by parameter name (gathered on every rank under ZeRO-3)."""
        with self.gathered() as teacher:
            return {n: p.detach().float().clone().cpu() for n, p in teacher.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from full fp32 weights; under ZeRO-3 each rank keeps its own partition."""
        for name, p in self.teacher.named_parameters():
            full = state[name].to(torch.float32)
            if self.engine.zero3:
                n = p.ds_tensor.numel()
                start = dist.get_rank() * n
                part = full.flatten()[start : start + n]
                p.ds_tensor.data.zero_()
                p.ds_tensor.data[: part.numel()].copy_(part.to(p.ds_tensor.device))
            else:
                p.data.copy_(full.to(p.device))

    def save(self, path: Path) -> list[str]:
        """Rank 0 writes the full EMA (collective under ZeRO-3); returns this rank's write errors."""
        state = self.state_dict()
        if dist.get_rank() != 0:
            return []
        try:
            save_file(state, str(path))
        except (OSError, SafetensorError) as err:
            return [write_error(path, err)]
        return []

    def load(self, path: Path) -> None:
        self.load_state_dict(load_file(str(path)))


def consolidated_student(folder: Path) -> dict[str, Tensor]:
    """Full fp32 student weights from a (verified) checkpoint folder of any ZeRO stage, offline."""
    with restricted_unpickling():
        if any(folder.glob("*optim_states.pt")) and any(folder.glob("zero_pp_rank_*")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        else:  # ZeRO stage 0: the module is saved whole
            state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}


def fresh_copy(model: nn.Module) -> nn.Module:
    """A detached fp32 copy of an (un-wrapped) model, made before `Engine.create`."""
    return copy.deepcopy(model).float()
