"""The one file that knows DeepSpeed: config dict, `deepspeed.initialize`, ZeRO-aware EMA, checkpoints.

Everything ZeRO-specific lives here (stages, partitioned parameters, gathering); the training
loop sees an `Engine` with `backward`, `step`, `lr`, `save`, `load` and an `EMATeacher` with
`update`, `teacher`, `state_dict`.

EMA teacher (fp32, DESIGN.md section 2):
- ZeRO 0-2: a replicated fp32 copy of the model, updated from the (full) student weights.
- ZeRO-3: a partitioned fp32 copy. Its shards are flat buffers laid out exactly like the
  optimizer's fp32 master partitions, so the update is one fused `lerp_` per parameter group
  from this rank's master shard, with no communication. The teacher module's partitions are
  views of those buffers, so gathering it for the forward reads the EMA (gathered copies are
  read-only: writes through them would be discarded).

    engine = Engine.create(model, ds_cfg, micro_batch=38, device=info.device)
    ema = EMATeacher.create(engine, model_copy)
    loss = ...; engine.backward(loss); engine.step(); ema.update(decay)
"""

import copy
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import GatheredParameters
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # 0-3
    bf16: bool = True  # bf16 weights/activations with fp32 master weights and fp32 gradient accumulation
    grad_clip: float = 1.0  # 0: off
    grad_accum: int = 1
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the learning rate

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.lr <= 0 or self.grad_clip < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and grad_clip, weight_decay, warmup_steps >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")


def ds_config_dict(cfg: DeepSpeedConfig, micro_batch: int) -> dict:
    """The DeepSpeed JSON config for `cfg` (AdamW, linear warm-up, ZeRO stage, bf16, clipping)."""
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": cfg.betas,
                "eps": cfg.eps,
                "weight_decay": cfg.weight_decay,
                # torch's multi-tensor AdamW: DeepSpeed's fused (GPU) and CPU Adam ops need a
                # C++/CUDA build at start-up, which a fresh node would pay on every job.
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": cfg.lr,
                "warmup_num_steps": max(cfg.warmup_steps, 1),
                "warmup_type": "linear",
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
# Processes


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
    if "RANK" not in env and "SLURM_PROCID" in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env["SLURM_LOCALID"])
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
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


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank (so all ranks take the same branch)."""
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    for name in _ADDED_ENV:
        os.environ.pop(name, None)
    _ADDED_ENV.clear()


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


class Engine:
    """A DeepSpeed engine plus the facts the loop needs (stage, dtype)."""

    def __init__(self, ds_engine, cfg: DeepSpeedConfig):
        self.ds, self.cfg = ds_engine, cfg
        self.module: nn.Module = ds_engine.module
        self.dtype = torch.bfloat16 if cfg.bf16 else torch.float32

    @classmethod
    def create(cls, model: nn.Module, cfg: DeepSpeedConfig, micro_batch: int, device: torch.device) -> "Engine":
        ds_cfg = ds_config_dict(cfg, micro_batch)
        model = model.to(device)
        ds_engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.weight_decay), config=ds_cfg
        )
        return cls(ds_engine, cfg)

    @property
    def zero3(self) -> bool:
        return self.cfg.zero_stage == 3

    def backward(self, loss: Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    @property
    def grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Full student weights readable inside (ZeRO-3 gathers them; other stages have them)."""
        ctx = GatheredParameters(list(self.module.parameters())) if self.zero3 else nullcontext()
        with ctx:
            yield

    def save(self, folder: Path, client_state: dict) -> None:
        """Model, optimizer and scheduler of every rank into `folder` (no `latest` pointer)."""
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, client_state=client_state, save_latest=False)

    def load(self, folder: Path) -> dict:
        _, client_state = self.ds.load_checkpoint(str(folder.parent), tag=folder.name)
        if client_state is None:
            raise ValueError(f"checkpoint {folder} could not be loaded by DeepSpeed")
        return client_state


# --------------------------------------------------------------------------------------------
# EMA teacher


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
        ctx = GatheredParameters(list(self.teacher.parameters())) if self.engine.zero3 else nullcontext()
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

    def save(self, path: Path) -> None:
        state = self.state_dict()
        if dist.get_rank() == 0:
            save_file(state, str(path))

    def load(self, path: Path) -> None:
        self.load_state_dict(load_file(str(path)))


def consolidated_student(folder: Path) -> dict[str, Tensor]:
    """Full fp32 student weights from a checkpoint folder of any ZeRO stage, offline (no processes)."""
    if any(folder.glob("*optim_states.pt")) and any(folder.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:  # ZeRO stage 0: the module is saved whole
        state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float().contiguous() for k, v in state.items()}


def fresh_copy(model: nn.Module) -> nn.Module:
    """A detached fp32 copy of an (un-wrapped) model, made before `Engine.create`."""
    return copy.deepcopy(model).float()
