"""A chunk-predicting policy with SimplerEnv's policy interface (RT-1 / Octo wrappers).

The model-dependent part is an `ActionSampler`: given the last `context_frames` frames and the
instruction it returns one *normalised* action chunk `(action_horizon, 7 or 8)` whose columns are
`[world_vector (3), rotation_delta (3, roll-pitch-yaw), gripper (1), terminate (optional)]`, the
RT-1 `fractal20220817_data` layout. `ChunkPolicy` keeps the frame history, calls the sampler,
executes the chunk open loop or averages overlapping chunks (temporal ensembling), un-normalises
with the converter's `stats.json` and converts to the 7-number action SimplerEnv's Google-robot
controller takes:

    stats = ActionStats.from_json("data/fractal/stats.json")
    policy = ChunkPolicy(sampler, stats, PolicyConfig(action_horizon=4, execute="average"))
    policy.reset("move the coke can near the apple")
    raw_action, action = policy.step(image, "move the coke can near the apple")
    env.step(np.concatenate([action["world_vector"], action["rot_axangle"], action["gripper"]]))

Conventions, from SimplerEnv's `simpler_env/policies/{rt1,octo}/*_model.py`:
- `step(image, instruction)` resets the policy when the instruction changes (long-horizon tasks
  change it mid-episode), exactly as the RT-1 and Octo wrappers do.
- `action["rot_axangle"]` is axis * angle. The Octo (and OpenVLA) wrappers read the fractal
  `rotation_delta` as roll-pitch-yaw and convert it with transforms3d `euler2axangle` (static
  x-y-z axes); the RT-1 wrapper's `google_robot` setup passes it on unchanged as an axis-angle
  vector. `rotation_mode` picks one ("rpy" default); for small deltas they nearly agree.
- gripper: the raw fractal `gripper_closedness_action` is already relative (+1 close, -1 open,
  0 keep), which the RT-1 wrapper sends as is to the `..._gripper_pd_joint_target_delta_pos...`
  controller (`gripper_mode="relative"`). A model that predicts an absolute "open" value in
  [0, 1] (Octo's standardised data) needs Octo's conversion: relative = previous - current,
  held ("sticky") for `sticky_gripper_repeat` steps (15 for the Google robot) once |relative| > 0.5
  (`gripper_mode="absolute_open"`).
- temporal ensembling follows SimplerEnv's `ActionEnsembler`: the predictions for the current
  step from the last `action_horizon` chunks, weighted `exp(-ensemble_temp * i)` with i = 0 the
  oldest (temp > 0 favours older predictions, < 0 newer, 0 a plain mean).
"""

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

ACTION_DIM = 7  # world_vector (3), rotation_delta (3), gripper (1)


class ActionSampler(Protocol):
    """The model-dependent part of a policy (the trunk plugs in here)."""

    def reset(self) -> None:
        """Called at the start of every episode (e.g. to reseed the sampler's noise)."""

    def sample(self, frames: np.ndarray, instruction: str) -> np.ndarray:
        """(T, H, W, 3) uint8 context frames, oldest first -> (action_horizon, 7 or 8) normalised chunk."""


@dataclass(frozen=True)
class ActionStats:
    """Affine un-normalisation `raw = normalised * scale + center` for the 7 action dimensions."""

    center: np.ndarray  # (7,)
    scale: np.ndarray  # (7,)

    @classmethod
    def from_dict(cls, stats: dict, kind: str = "auto", source: str = "stats") -> "ActionStats":
        """`mean`/`std` (z-scores) or `q01`/`q99` (the [q01, q99] range mapped to [-1, 1]); lists of >= 7 numbers.

        A dict with an `action` entry (per-key statistics files) is read from that entry.
        """
        if isinstance(stats.get("action"), dict):
            stats = stats["action"]
        if kind == "auto":
            kind = "mean_std" if "mean" in stats and "std" in stats else "quantile"
        keys = {"mean_std": ("mean", "std"), "quantile": ("q01", "q99")}.get(kind)
        if keys is None:
            raise ValueError(f"{source}: kind must be 'auto', 'mean_std' or 'quantile', got {kind!r}")
        for key in keys:
            if key not in stats:
                raise ValueError(f"{source}: missing key {key!r} for {kind} statistics (keys: {sorted(stats)})")
            if len(stats[key]) < ACTION_DIM:
                raise ValueError(f"{source}: {key!r} has {len(stats[key])} numbers, need at least {ACTION_DIM}")
        a, b = (np.asarray(stats[k][:ACTION_DIM], dtype=np.float64) for k in keys)
        if kind == "mean_std":
            return cls(center=a, scale=b)
        return cls(center=(a + b) / 2, scale=(b - a) / 2)

    @classmethod
    def from_json(cls, path: str | Path, kind: str = "auto") -> "ActionStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"action statistics file {path} not found (written by the RT-1 converter)")
        return cls.from_dict(json.loads(path.read_text()), kind=kind, source=str(path))

    def unnormalise(self, normalised: np.ndarray) -> np.ndarray:
        return np.asarray(normalised, dtype=np.float64)[..., :ACTION_DIM] * self.scale + self.center


@dataclass
class PolicyConfig:
    action_horizon: int = 4  # rows of every chunk the sampler returns
    execute: str = "open_loop"  # "open_loop" (sample when the chunk runs out) | "average" (sample every step)
    exec_horizon: int | None = None  # open loop: actions executed per chunk (None: all action_horizon)
    ensemble_temp: float = 0.0  # average: weight exp(-temp * i) of the i-th oldest prediction
    context_frames: int = 1  # frames handed to the sampler, oldest first
    image_size: tuple[int, int] = (256, 320)  # (H, W) the model wants; fractal frames are 256x320
    action_scale: float = 1.0  # multiplies world_vector and rot_axangle, as the SimplerEnv wrappers do
    rotation_mode: str = "rpy"  # "rpy" (euler2axangle, Octo/OpenVLA) | "axis_angle" (RT-1 google_robot)
    gripper_mode: str = "relative"  # "relative" (fractal closedness) | "absolute_open" (Octo's sticky conversion)
    sticky_gripper_repeat: int = 15  # absolute_open: steps a gripper change is held (Octo, google_robot)
    terminate_threshold: float = 0.5  # column 8 of the chunk above this -> terminate_episode = 1

    def __post_init__(self):
        choices = {"execute": ("open_loop", "average"), "rotation_mode": ("rpy", "axis_angle")}
        choices["gripper_mode"] = ("relative", "absolute_open")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"PolicyConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("action_horizon", "context_frames", "sticky_gripper_repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"PolicyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.exec_horizon is not None and not 1 <= self.exec_horizon <= self.action_horizon:
            raise ValueError(
                f"PolicyConfig.exec_horizon must be in [1, {self.action_horizon}], got {self.exec_horizon}"
            )
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"PolicyConfig.image_size must be (H, W) with positive sizes, got {self.image_size}")


def rpy_to_axis_angle(rpy: np.ndarray) -> np.ndarray:
    """Roll-pitch-yaw about static x, y, z (R = Rz(yaw) Ry(pitch) Rx(roll), transforms3d's 'sxyz') -> axis * angle.

    Goes through the unit quaternion; the angle is the smallest one, in [0, pi] (transforms3d's
    `euler2axangle` can return the complementary angle > pi for the same rotation beyond pi).
    """
    roll, pitch, yaw = np.asarray(rpy, dtype=np.float64) / 2
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    w = cr * cp * cy + sr * sp * sy
    v = np.array([sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy])
    if w < 0:  # q and -q are the same rotation; keep the one with angle <= pi
        w, v = -w, -v
    sin_half = np.linalg.norm(v)
    if sin_half < 1e-12:
        return 2 * v / w  # small-angle limit of axis * 2 * atan2(sin_half, w)
    return v / sin_half * 2 * np.arctan2(sin_half, w)


def resize_frame(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[0], size[1], 3) uint8 (bilinear, antialiased when shrinking).

    SimplerEnv's 512x640 overhead camera has the 4:5 shape of the 256x320 fractal frames, so a plain
    resize equals RT-1's `resize_with_pad` there.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {image.shape} dtype {image.dtype}")
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


class ChunkPolicy:
    """`reset(instruction)` / `step(image, instruction) -> (raw_action, action)` over an `ActionSampler`."""

    def __init__(self, sampler: ActionSampler, stats: ActionStats, cfg: PolicyConfig):
        self.sampler, self.stats, self.cfg = sampler, stats, cfg
        self.num_sampler_calls = 0  # over the policy's lifetime; handy for logs and tests
        self.instruction: str | None = None
        self.reset(None)

    def reset(self, instruction: str | None) -> None:
        self.instruction = instruction
        self.frames: deque[np.ndarray] = deque(maxlen=self.cfg.context_frames)
        self.queue: list[np.ndarray] = []  # open loop: the rest of the current chunk
        self.chunks: deque[np.ndarray] = deque(maxlen=self.cfg.action_horizon)  # average: recent chunks
        self.previous_open: float | None = None  # absolute_open gripper state
        self.sticky_action, self.sticky_left = 0.0, 0
        if instruction is not None:
            self.sampler.reset()

    def step(self, image: np.ndarray, instruction: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if instruction != self.instruction:
            self.reset(instruction)  # as SimplerEnv's RT-1 / Octo wrappers do
        frame = resize_frame(image, self.cfg.image_size)
        if not self.frames:  # first frame of an episode: repeat it to fill the context
            self.frames.extend([frame] * self.cfg.context_frames)
        else:
            self.frames.append(frame)
        return self.actions_from(self.next_normalised())

    def next_normalised(self) -> np.ndarray:
        """The normalised (7 or 8,) action for this step."""
        if self.cfg.execute == "open_loop":
            if not self.queue:
                chunk = self.sample()
                self.queue = list(chunk[: self.cfg.exec_horizon or self.cfg.action_horizon])
            return self.queue.pop(0)
        self.chunks.append(self.sample())
        n = len(self.chunks)
        # chunk i (0 = oldest) was sampled n - 1 - i steps ago, so its row n - 1 - i is for this step
        preds = np.stack([chunk[n - 1 - i] for i, chunk in enumerate(self.chunks)])
        weights = np.exp(-self.cfg.ensemble_temp * np.arange(n))
        return (weights / weights.sum()) @ preds

    def sample(self) -> np.ndarray:
        chunk = np.asarray(self.sampler.sample(np.stack(self.frames), self.instruction), dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] != self.cfg.action_horizon or chunk.shape[1] not in (7, 8):
            raise ValueError(
                f"sampler returned a chunk of shape {chunk.shape}, expected ({self.cfg.action_horizon}, 7 or 8)"
            )
        self.num_sampler_calls += 1
        return chunk

    def actions_from(self, normalised: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        raw = self.stats.unnormalise(normalised)
        terminate = float(normalised.shape[0] > ACTION_DIM and normalised[ACTION_DIM] > self.cfg.terminate_threshold)
        gripper_key = "gripper_closedness_action" if self.cfg.gripper_mode == "relative" else "open_gripper"
        raw_action = {
            "world_vector": raw[:3],
            "rotation_delta": raw[3:6],
            gripper_key: raw[6:7],
            "terminate_episode": np.array([terminate]),
        }
        rotation = rpy_to_axis_angle(raw[3:6]) if self.cfg.rotation_mode == "rpy" else raw[3:6].copy()
        action = {
            "world_vector": raw[:3] * self.cfg.action_scale,
            "rot_axangle": rotation * self.cfg.action_scale,
            "gripper": self.gripper(float(raw[6])),
            "terminate_episode": np.array([terminate]),
        }
        return raw_action, action

    def gripper(self, value: float) -> np.ndarray:
        """(1,) gripper command for the Google robot's relative gripper controller (1 close, -1 open)."""
        if self.cfg.gripper_mode == "relative":
            return np.array([np.clip(value, -1.0, 1.0)])
        # Octo's google_robot conversion (simpler_env/policies/octo/octo_model.py)
        relative = 0.0 if self.previous_open is None else self.previous_open - value
        self.previous_open = value
        if abs(relative) > 0.5 and self.sticky_left == 0:
            self.sticky_action, self.sticky_left = relative, self.cfg.sticky_gripper_repeat
        if self.sticky_left > 0:
            relative = self.sticky_action
            self.sticky_left -= 1
        return np.array([relative])


class ConstantSampler:
    """Returns the same normalised chunk every call (tests, smoke runs)."""

    def __init__(self, chunk: np.ndarray):
        self.chunk = np.asarray(chunk, dtype=np.float64)
        self.calls: list[tuple[np.ndarray, str]] = []  # (frames, instruction) of every call

    def reset(self) -> None:
        pass

    def sample(self, frames: np.ndarray, instruction: str) -> np.ndarray:
        self.calls.append((frames, instruction))
        return self.chunk.copy()


class ReplaySampler:
    """Replays the given chunks in order from every `reset()`, then keeps returning the last one."""

    def __init__(self, chunks: list[np.ndarray]):
        if not chunks:
            raise ValueError("ReplaySampler needs at least one chunk")
        self.chunks = [np.asarray(c, dtype=np.float64) for c in chunks]
        self.index = 0
        self.calls: list[tuple[np.ndarray, str]] = []

    def reset(self) -> None:
        self.index = 0

    def sample(self, frames: np.ndarray, instruction: str) -> np.ndarray:
        self.calls.append((frames, instruction))
        chunk = self.chunks[min(self.index, len(self.chunks) - 1)]
        self.index += 1
        return chunk.copy()
