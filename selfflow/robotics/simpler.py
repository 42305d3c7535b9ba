"""SIMPLER (SimplerEnv) evaluation of a policy on the Google-robot visual-matching tasks.

    policy = ChunkPolicy(sampler, stats, PolicyConfig())
    results = run_simpler(policy, SimplerConfig(out_dir="runs/simpler", episodes_per_task=60))
    # runs/simpler/results.json, results.md, <task>/episode_000.json + .mp4, ...

Or `main_eval_simpler(cfg, make_policy)`, which checks the machine first (`preflight`) and
returns exit status 2 with a plain message when SIMPLER cannot run here (the CLI's
`selfflow robotics eval-simpler` calls it).

SIMPLER needs `simpler_env` (installed by the user from the SimplerEnv git repository,
`simpler-env/SimplerEnv`, with its `ManiSkill2_real2sim` submodule; there is no PyPI package) and
a Vulkan-capable GPU for SAPIEN's renderer. The loop follows SimplerEnv's
`simpler_env/evaluation/maniskill2_evaluator.py`:

- `env = simpler_env.make(task)` builds the prepackaged visual-matching env
  (`prepackaged_config=True`: overlay image, robot pose and URDF recolouring drawn per episode
  from the reset seed);
- `obs, _ = env.reset(seed=..., options=...)`, instruction from `env.get_language_instruction()`,
  the image from `get_image_from_maniskill2_obs_dict(env, obs)` (the overhead camera);
- `raw_action, action = policy.step(image, instruction)`, then
  `env.step(np.concatenate([world_vector, rot_axangle, gripper]))`;
- a predicted `terminate_episode` ends the episode, except on a long-horizon task whose current
  subtask is not the last (`env.is_final_subtask()`), where it calls
  `env.advance_to_next_subtask()` instead (open drawer -> place apple);
- the episode also ends on truncation (the env's own step limit) or `max_steps`; success is the
  env's `success` at the *last* step (not "ever succeeded"; `stop_on_success=True` changes that).

Reset options (from the visual-matching scripts `scripts/*_visual_matching.sh` and the envs in
`ManiSkill2_real2sim/.../custom_scenes/`): Move Near has 60 configurations, chosen with
`obj_init_options={"episode_id": i}` (5 object triplets x 6 source/target pairs x 2 layouts);
"open top drawer and place apple" places the apple on the 3x3 grid x in [-0.08, -0.02],
y in [-0.02, 0.08] (`obj_init_options={"init_xy": ...}`), the seed picking the robot pose,
overlay and URDF; the other Google tasks are drawn from the seed alone.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from selfflow.data.synth_visual import encode_mp4, pick_video_codec

# SimplerEnv task names (simpler_env/__init__.py ENVIRONMENTS). The paper's two Google-robot tasks:
PAPER_TASKS = ("google_robot_move_near", "google_robot_place_apple_in_closed_top_drawer")
OTHER_GOOGLE_TASKS = (
    "google_robot_pick_horizontal_coke_can",
    "google_robot_pick_vertical_coke_can",
    "google_robot_pick_standing_coke_can",
    "google_robot_open_top_drawer",
    "google_robot_open_middle_drawer",
    "google_robot_open_bottom_drawer",
    "google_robot_close_top_drawer",
    "google_robot_close_middle_drawer",
    "google_robot_close_bottom_drawer",
)
# Step limits of the visual-matching runs (register_env max_episode_steps / --max-episode-steps)
TASK_MAX_STEPS = {"move_near": 80, "coke_can": 80, "place_apple": 200, "drawer": 113}
MOVE_NEAR_EPISODES = 60
APPLE_XY_GRID = [(x, y) for x in np.linspace(-0.08, -0.02, 3) for y in np.linspace(-0.02, 0.08, 3)]
ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")
INSTALL_HINT = (
    "install SimplerEnv from its git repository (simpler-env/SimplerEnv, cloned with --recurse-submodules): "
    "`pip install -e ManiSkill2_real2sim && pip install -e .` inside the clone"
)


class SimplerUnavailableError(RuntimeError):
    """SIMPLER cannot run on this machine; the message says what is missing and how to fix it."""


class Policy(Protocol):
    def reset(self, instruction: str) -> None: ...

    def step(self, image: np.ndarray, instruction: str) -> tuple[dict, dict]: ...


@dataclass
class SimplerConfig:
    tasks: tuple[str, ...] = PAPER_TASKS
    all_google_tasks: bool = False  # add OTHER_GOOGLE_TASKS (coke can, open / close drawer)
    episodes_per_task: int = MOVE_NEAR_EPISODES
    max_steps: int | None = None  # None: TASK_MAX_STEPS for the task
    out_dir: str = "runs/simpler"
    seed: int = 0  # episode i resets with seed + i
    video_fps: int = 5  # SimplerEnv writes its videos at 5 fps
    save_video: bool = True
    stop_on_success: bool = False  # SimplerEnv's protocol runs on and scores the last step

    def __post_init__(self):
        if self.episodes_per_task < 1:
            raise ValueError(f"SimplerConfig.episodes_per_task must be >= 1, got {self.episodes_per_task}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"SimplerConfig.max_steps must be >= 1 or None, got {self.max_steps}")
        self.tasks = tuple(self.tasks)

    def task_list(self) -> list[str]:
        extra = [t for t in OTHER_GOOGLE_TASKS if t not in self.tasks] if self.all_google_tasks else []
        return list(self.tasks) + extra


# ---------------------------------------------------------------- machine checks


def find_vulkan_device(icd_dirs=ICD_DIRS, vulkaninfo: str = "vulkaninfo") -> str | None:
    """A description of a usable Vulkan GPU, or None.

    With `vulkaninfo` on PATH: `vulkaninfo --summary` must exit 0 and list a GPU (integrated,
    discrete or virtual; CPU-only software drivers such as lavapipe do not count). Without it: a
    Vulkan ICD manifest (`*.json`) in `icd_dirs` or named by VK_ICD_FILENAMES / VK_DRIVER_FILES,
    other than lavapipe's (`lvp_icd*`) -- SAPIEN looks for the NVIDIA one in
    /usr/share/vulkan/icd.d, containers often mount it under /etc/vulkan/icd.d.
    """
    if shutil.which(vulkaninfo):
        try:
            out = subprocess.run([vulkaninfo, "--summary"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        gpu_types = ("PHYSICAL_DEVICE_TYPE_DISCRETE_GPU", "INTEGRATED_GPU", "VIRTUAL_GPU")
        if out.returncode != 0 or not any(t in out.stdout for t in gpu_types):
            return None
        names = [line.split("=", 1)[1].strip() for line in out.stdout.splitlines() if "deviceName" in line]
        return f"vulkaninfo: {', '.join(names) or 'a GPU'}"
    manifests = [
        Path(p) for var in ("VK_ICD_FILENAMES", "VK_DRIVER_FILES") for p in os.environ.get(var, "").split(":") if p
    ]
    manifests += [p for d in icd_dirs if Path(d).is_dir() for p in sorted(Path(d).glob("*.json"))]
    manifests = [p for p in manifests if p.is_file() and not p.name.startswith("lvp_icd")]
    return f"Vulkan ICD manifest {manifests[0]}" if manifests else None


def preflight(icd_dirs=ICD_DIRS, vulkaninfo: str = "vulkaninfo") -> None:
    """Raise `SimplerUnavailableError` naming everything missing for SIMPLER on this machine."""
    problems = []
    try:
        import simpler_env  # noqa: F401  (user-installed; see INSTALL_HINT)
    except Exception as err:  # ImportError, or a dependency of it failing to load
        problems.append(f"cannot import simpler_env ({type(err).__name__}: {err}); {INSTALL_HINT}")
    if find_vulkan_device(icd_dirs, vulkaninfo) is None:
        problems.append(
            "no Vulkan GPU found (checked `vulkaninfo --summary`, else a Vulkan ICD json under "
            f"{', '.join(icd_dirs)} or VK_ICD_FILENAMES); SIMPLER renders with SAPIEN and needs an NVIDIA GPU "
            "with its Vulkan driver (e.g. the driver's nvidia_icd.json plus libvulkan1); it cannot run on CPU"
        )
    if problems:
        raise SimplerUnavailableError("SIMPLER evaluation cannot run here:\n- " + "\n- ".join(problems))


# ---------------------------------------------------------------- episodes


def task_max_steps(task: str) -> int:
    for key, steps in TASK_MAX_STEPS.items():
        if key in task:
            return steps
    return 200


def reset_options(task: str, episode: int) -> dict:
    """Visual-matching reset options for `episode` of `task` (see the module docstring)."""
    if "move_near" in task:
        return {"obj_init_options": {"episode_id": episode % MOVE_NEAR_EPISODES}}
    if "place_apple" in task:
        x, y = APPLE_XY_GRID[episode % len(APPLE_XY_GRID)]
        return {"obj_init_options": {"init_xy": [float(x), float(y)]}}
    return {}


@dataclass
class Rollout:
    frames: list[np.ndarray]  # initial observation and one per step
    actions: list[np.ndarray]  # the 7-number actions sent to env.step
    instructions: list[str]  # each distinct instruction in order
    success: bool  # env success at the last step
    success_any: bool  # env success at any step
    end_reason: str  # "policy_terminate" | "truncated" | "max_steps" | "success"
    infos: list[dict] = field(default_factory=list, repr=False)


def is_final_subtask(env) -> bool:
    check = getattr(env, "is_final_subtask", None)  # only long-horizon SimplerEnv versions have it
    return True if check is None else bool(check())


def rollout(policy: Policy, env, seed: int, options: dict, max_steps: int, image_fn, stop_on_success: bool) -> Rollout:
    """One episode, as SimplerEnv's `run_maniskill2_eval_single_episode`."""
    obs, _ = env.reset(seed=seed, options=options)
    instruction = env.get_language_instruction()
    policy.reset(instruction)
    out = Rollout([np.asarray(image_fn(env, obs))], [], [instruction], False, False, "max_steps")
    final = is_final_subtask(env)
    for _ in range(max_steps):
        _, action = policy.step(out.frames[-1], instruction)
        terminate = bool(action["terminate_episode"][0] > 0)
        if terminate and not final:
            env.advance_to_next_subtask()
            terminate = False
        command = np.concatenate([action["world_vector"], action["rot_axangle"], action["gripper"]])
        out.actions.append(command)
        obs, _, terminated, truncated, info = env.step(command)
        out.success = bool(info.get("success", terminated))
        out.success_any |= out.success
        instruction = env.get_language_instruction()
        if instruction != out.instructions[-1]:
            out.instructions.append(instruction)
        final = is_final_subtask(env)
        out.frames.append(np.asarray(image_fn(env, obs)))
        out.infos.append(info)
        end = "policy_terminate" if terminate else "truncated" if truncated else None
        end = end or ("success" if stop_on_success and out.success else None)
        if end:
            out.end_reason = end
            break
    return out


def even_crop(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides; drop a last row / column if needed."""
    return frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]


def episode_record(task: str, episode: int, seed: int, options: dict, run: Rollout, sampler_calls) -> dict:
    summary = {}
    if run.actions:
        actions = np.stack(run.actions)
        summary = {"mean": actions.mean(0).tolist(), "min": actions.min(0).tolist(), "max": actions.max(0).tolist()}
    return {
        "task": task,
        "episode": episode,
        "seed": seed,
        "reset_options": options,
        "instruction": run.instructions[0],
        "instructions": run.instructions,
        "steps": len(run.actions),
        "success": run.success,
        "success_any_step": run.success_any,
        "end_reason": run.end_reason,
        "sampler_calls": sampler_calls,  # None for a policy without a `num_sampler_calls` counter
        "actions": {"layout": "world_vector(3) rot_axangle(3) gripper(1)", **summary},
    }


# ---------------------------------------------------------------- the evaluation


def default_env_and_image_fn():
    """`simpler_env.make` and SimplerEnv's observation helper, after `preflight()`."""
    preflight()
    import simpler_env
    from simpler_env.utils.env.observation_utils import get_image_from_maniskill2_obs_dict

    return simpler_env.make, get_image_from_maniskill2_obs_dict


def run_task(policy: Policy, env, task: str, cfg: SimplerConfig, image_fn, codec: str | None) -> list[dict]:
    task_dir = Path(cfg.out_dir) / task
    task_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for episode in range(cfg.episodes_per_task):
        seed, options = cfg.seed + episode, reset_options(task, episode)
        max_steps = cfg.max_steps or task_max_steps(task)
        calls_before = getattr(policy, "num_sampler_calls", None)
        run = rollout(policy, env, seed, options, max_steps, image_fn, cfg.stop_on_success)
        calls = None if calls_before is None else policy.num_sampler_calls - calls_before
        record = episode_record(task, episode, seed, options, run, calls)
        record["video"] = None
        if codec is not None:
            video = task_dir / f"episode_{episode:03d}.mp4"
            video.write_bytes(encode_mp4(even_crop(np.stack(run.frames)), cfg.video_fps, codec))
            record["video"] = video.name
        (task_dir / f"episode_{episode:03d}.json").write_text(json.dumps(record, indent=2))
        records.append(record)
    return records


def run_simpler(
    policy: Policy,
    cfg: SimplerConfig,
    make_env: Callable[[str], Any] | None = None,
    image_fn: Callable[[Any, Any], np.ndarray] | None = None,
) -> dict:
    """Evaluate `policy` on every task of `cfg`; write per-episode files and the success-rate table."""
    if make_env is None or image_fn is None:
        default_make, default_image = default_env_and_image_fn()
        make_env, image_fn = make_env or default_make, image_fn or default_image
    codec = pick_video_codec() if cfg.save_video else None
    tasks = {}
    for task in cfg.task_list():
        env = make_env(task)
        try:
            records = run_task(policy, env, task, cfg, image_fn, codec)
        finally:
            getattr(env, "close", lambda: None)()
        successes = sum(r["success"] for r in records)
        tasks[task] = {"episodes": len(records), "successes": successes, "success_rate": successes / len(records)}
    results = {
        "tasks": tasks,
        "mean_success_rate": float(np.mean([t["success_rate"] for t in tasks.values()])),
        "config": asdict(cfg),
    }
    out = Path(cfg.out_dir)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results))
    return results


def results_markdown(results: dict) -> str:
    lines = ["| task | episodes | successes | success rate |", "|---|---:|---:|---:|"]
    for task, row in results["tasks"].items():
        lines.append(f"| {task} | {row['episodes']} | {row['successes']} | {100 * row['success_rate']:.1f}% |")
    lines.append(f"| **mean** | | | {100 * results['mean_success_rate']:.1f}% |")
    return "\n".join(lines) + "\n"


def main_eval_simpler(cfg: SimplerConfig, make_policy: Callable[[], Policy]) -> int:
    """Check the machine, then build the policy and evaluate; 2 with the plain message when SIMPLER cannot run."""
    try:
        preflight()
    except SimplerUnavailableError as err:
        print(err, file=sys.stderr)
        return 2
    results = run_simpler(make_policy(), cfg)
    print(results_markdown(results))
    return 0
