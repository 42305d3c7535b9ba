"""ChunkPolicy (SimplerEnv's policy interface) and the SIMPLER evaluation loop, on a small reach environment.

`ReachEnv` has the API the loop uses (reset with seed/options -> (obs, info), step with the
7-number action -> (obs, reward, terminated, truncated, info["success"]), an overhead-camera
image, get_language_instruction); its end effector integrates `world_vector`, so success depends
on the actions. Reference values come from formulas written here (z * std + mean, scipy's
Euler -> rotation vector, Rz Ry Rx matrices, SimplerEnv's ensembling and Octo's sticky gripper).

    OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_simpler_loop.py
"""

import importlib.util
import json

import av
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from selfflow.robotics.policy import (
    ActionStats,
    ChunkPolicy,
    ConstantSampler,
    PolicyConfig,
    ReplaySampler,
    rpy_to_axis_angle,
)
from selfflow.robotics.simpler import (
    SimplerConfig,
    SimplerUnavailableError,
    find_vulkan_device,
    main_eval_simpler,
    preflight,
    reset_options,
    run_simpler,
)

MEAN = np.array([0.01, -0.02, 0.005, 0.0, 0.01, -0.01, 0.0])
STD = np.array([0.05, 0.04, 0.03, 0.1, 0.2, 0.15, 1.0])
STATS = ActionStats.from_dict({"mean": MEAN.tolist(), "std": STD.tolist()})
TARGET = np.array([0.12, -0.08, 0.04])
ROT_Z = np.array([0.5, -1.0, 2.0])  # normalised rotation columns of every moving row
H, W = 24, 32


class ReachEnv:
    """End effector at `pos` moves by each action's world_vector; success: within `tol` of `target`."""

    def __init__(self, target, tol=0.01, max_episode_steps=30):
        self.target, self.tol, self.max_episode_steps = np.asarray(target, float), tol, max_episode_steps
        self.reset_calls, self.received, self.images = [], [], []

    def reset(self, seed=None, options=None):
        self.reset_calls.append((seed, options))
        self.pos, self.steps = np.zeros(3), 0
        return self.observation(), {}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        assert action.shape == (7,), action.shape
        self.received.append(action)
        self.pos, self.steps = self.pos + action[:3], self.steps + 1
        success = self.succeeded()
        truncated = self.steps >= self.max_episode_steps
        return self.observation(), float(success), success, truncated, {"success": success}

    def succeeded(self) -> bool:
        return bool(np.linalg.norm(self.pos - self.target) < self.tol)

    def observation(self):
        image = np.full((H, W, 3), 40, dtype=np.uint8)
        image[..., 0] = min(255, 20 * self.steps)  # every frame differs
        col, row = np.clip(((self.pos[:2] + 0.4) / 0.8 * [W, H]).astype(int), 0, [W - 4, H - 4])
        image[row : row + 4, col : col + 4] = 255
        self.images.append(image)
        return {"image": {"overhead_camera": {"rgb": image}}}

    def get_language_instruction(self):
        return "reach the target"


class TwoStageEnv(ReachEnv):
    """Long-horizon: subtask 0 'open drawer', then 'place apple'; success needs subtask 1 at `target`."""

    def reset(self, seed=None, options=None):
        self.stage, self.advanced_at = 0, None
        return super().reset(seed, options)

    def succeeded(self):
        return self.stage == 1 and super().succeeded()

    def get_language_instruction(self):
        return "open drawer" if self.stage == 0 else "place apple"

    def is_final_subtask(self):
        return self.stage == 1

    def advance_to_next_subtask(self):
        self.stage, self.advanced_at = 1, self.steps


def overhead(env, obs):
    return obs["image"]["overhead_camera"]["rgb"]


def normalised_row(world_vector, terminate=0.0, gripper=0.3):
    z = np.empty(8)
    z[:3] = (np.asarray(world_vector) - MEAN[:3]) / STD[:3]
    z[3:6], z[6], z[7] = ROT_Z, gripper, terminate
    return z


def reach_chunks(step_vector, horizon=4):
    """Two chunks moving by `step_vector` per step, then a still chunk that terminates at once."""
    move = np.stack([normalised_row(step_vector)] * horizon)
    stop = np.stack([normalised_row(np.zeros(3), terminate=1.0)] * horizon)
    return [move, move, stop]


def expected_command(z, scale=1.0):
    raw = z[:7] * STD + MEAN  # independent un-normalisation
    rotvec = Rotation.from_euler("xyz", raw[3:6]).as_rotvec()  # extrinsic x-y-z = transforms3d 'sxyz'
    return np.concatenate([raw[:3] * scale, rotvec * scale, np.clip(raw[6:7], -1, 1)])


def rotation_matrix(rpy):
    r, p, y = rpy
    rx = np.array([[1, 0, 0], [0, np.cos(r), -np.sin(r)], [0, np.sin(r), np.cos(r)]])
    ry = np.array([[np.cos(p), 0, np.sin(p)], [0, 1, 0], [-np.sin(p), 0, np.cos(p)]])
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rodrigues(rotvec):
    angle = np.linalg.norm(rotvec)
    k = rotvec / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


def test_rpy_to_axis_angle_matches_scipy_and_rotation_matrices():
    rng = np.random.default_rng(0)
    for rpy in rng.uniform(-1.0, 1.0, size=(50, 3)):
        np.testing.assert_allclose(rpy_to_axis_angle(rpy), Rotation.from_euler("xyz", rpy).as_rotvec(), atol=1e-12)
    for rpy in rng.uniform(-np.pi, np.pi, size=(50, 3)):  # any angle: same rotation, angle <= pi
        rotvec = rpy_to_axis_angle(rpy)
        assert np.linalg.norm(rotvec) <= np.pi + 1e-12
        np.testing.assert_allclose(rodrigues(rotvec), rotation_matrix(rpy), atol=1e-12)
    np.testing.assert_allclose(rpy_to_axis_angle([0.0, 0.0, 0.3]), [0.0, 0.0, 0.3], atol=1e-15)  # pure yaw
    np.testing.assert_allclose(rpy_to_axis_angle([1e-9, -2e-9, 3e-9]), [1e-9, -2e-9, 3e-9], rtol=1e-6)
    np.testing.assert_array_equal(rpy_to_axis_angle(np.zeros(3)), np.zeros(3))


def test_action_stats_from_json(tmp_path):
    z = np.array([0.5, -1.0, 2.0, 0.1, -0.3, 0.7, 0.9, 1.0])
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"mean": MEAN.tolist(), "std": STD.tolist()}))
    np.testing.assert_allclose(ActionStats.from_json(path).unnormalise(z), z[:7] * STD + MEAN)
    q01, q99 = MEAN - 2 * STD, MEAN + 3 * STD
    path.write_text(json.dumps({"action": {"q01": q01.tolist(), "q99": q99.tolist()}}))
    np.testing.assert_allclose(ActionStats.from_json(path).unnormalise(z), (z[:7] + 1) / 2 * (q99 - q01) + q01)
    path.write_text(json.dumps({"mean": MEAN.tolist()}))
    with pytest.raises(ValueError, match="q01"):
        ActionStats.from_json(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ActionStats.from_json(tmp_path / "missing.json")


def test_open_loop_executes_chunks_and_converts_actions():
    chunks = [np.random.default_rng(k).normal(size=(4, 7)) for k in range(3)]
    sampler = ReplaySampler(chunks)
    cfg = PolicyConfig(action_horizon=4, exec_horizon=2, image_size=(H, W), action_scale=2.0)
    policy = ChunkPolicy(sampler, STATS, cfg)
    policy.reset("lift")
    for t in range(6):
        raw, action = policy.step(np.zeros((H, W, 3), np.uint8), "lift")
        z = chunks[t // 2][t % 2]
        np.testing.assert_allclose(raw["world_vector"], z[:3] * STD[:3] + MEAN[:3])
        np.testing.assert_allclose(raw["rotation_delta"], z[3:6] * STD[3:6] + MEAN[3:6])
        command = np.concatenate([action["world_vector"], action["rot_axangle"], action["gripper"]])
        np.testing.assert_allclose(command, expected_command(z, scale=2.0), atol=1e-12)
        assert action["terminate_episode"].tolist() == [0.0]  # 7-column chunks never terminate
    assert policy.num_sampler_calls == 3 == len(sampler.calls)
    policy.step(np.zeros((H, W, 3), np.uint8), "put down")  # a new instruction resets: chunk 0 again
    assert policy.num_sampler_calls == 4 and sampler.calls[-1][1] == "put down"


@pytest.mark.parametrize("temp", [0.0, 0.5, -0.5])
def test_average_ensembles_overlapping_chunks(temp):
    horizon = 3
    chunks = [np.full((horizon, 8), 10.0 * k) + np.arange(horizon)[:, None] for k in range(6)]
    for chunk in chunks:
        chunk[:, 7] = -1.0  # never terminate
    cfg = PolicyConfig(action_horizon=horizon, execute="average", ensemble_temp=temp, image_size=(H, W))
    policy = ChunkPolicy(ReplaySampler(chunks), STATS, cfg)
    for t in range(6):
        raw, _ = policy.step(np.zeros((H, W, 3), np.uint8), "stack")
        made = list(range(max(0, t - horizon + 1), t + 1))  # chunks that cover step t, oldest first
        weights = np.array([np.exp(-temp * i) for i in range(len(made))])
        z = sum(w * chunks[k][t - k] for w, k in zip(weights, made, strict=True)) / weights.sum()
        np.testing.assert_allclose(raw["world_vector"], z[:3] * STD[:3] + MEAN[:3], rtol=1e-12)
    assert policy.num_sampler_calls == 6


def test_absolute_open_gripper_follows_octo_sticky_rule():
    opens = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    chunk = np.zeros((len(opens), 7))
    chunk[:, 6] = opens  # gripper statistics are mean 0, std 1
    cfg = PolicyConfig(action_horizon=len(opens), gripper_mode="absolute_open", sticky_gripper_repeat=3)
    policy = ChunkPolicy(ConstantSampler(chunk), STATS, cfg)
    out = [policy.step(np.zeros((8, 8, 3), np.uint8), "grasp")[1]["gripper"][0] for _ in opens]
    # Octo: relative = previous - current (1 close, -1 open), held for 3 steps once |relative| > 0.5
    assert out == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, -1.0, -1.0]
    assert ConstantSampler(chunk).sample(np.zeros((1, 8, 8, 3), np.uint8), "x").shape == chunk.shape


def test_context_frames_and_resize():
    sampler = ConstantSampler(np.zeros((4, 7)))
    policy = ChunkPolicy(sampler, STATS, PolicyConfig(context_frames=2, image_size=(H, W)))
    env = ReachEnv(TARGET)
    obs, _ = env.reset()
    for _ in range(5):
        _, action = policy.step(overhead(env, obs), "reach the target")
        obs, *_ = env.step(np.concatenate([action["world_vector"], action["rot_axangle"], action["gripper"]]))
    (first, _), (second, _) = sampler.calls
    np.testing.assert_array_equal(first, np.stack([env.images[0], env.images[0]]))  # first frame repeated
    np.testing.assert_array_equal(second, np.stack([env.images[3], env.images[4]]))
    rows, cols = np.mgrid[:H, :W]
    ramp = np.stack([4 * cols + 2 * rows, 3 * rows + cols, 200 - 2 * cols], axis=-1).astype(np.uint8)
    big = np.repeat(np.repeat(ramp, 2, axis=0), 2, axis=1)  # (2H, 2W) nearest upsample: back to (H, W)
    policy.reset("other")
    policy.step(big, "other")
    assert sampler.calls[-1][0].shape == (2, H, W, 3)
    interior = np.abs(sampler.calls[-1][0][0].astype(int) - ramp)[2:-2, 2:-2]
    assert interior.max() <= 1  # a linear ramp survives a symmetric 2x downscale


def decode_frames(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_run_simpler_end_to_end(tmp_path):
    envs = {"move_near_reach": ReachEnv(TARGET), "reach_far": ReachEnv(3 * TARGET)}
    sampler = ReplaySampler(reach_chunks(TARGET / 8))
    policy = ChunkPolicy(sampler, STATS, PolicyConfig(action_horizon=4, image_size=(H, W)))
    cfg = SimplerConfig(tasks=tuple(envs), episodes_per_task=2, max_steps=20, out_dir=str(tmp_path), seed=7)
    results = run_simpler(policy, cfg, make_env=envs.__getitem__, image_fn=overhead)

    assert results["tasks"]["move_near_reach"] == {"episodes": 2, "successes": 2, "success_rate": 1.0}
    assert results["tasks"]["reach_far"] == {"episodes": 2, "successes": 0, "success_rate": 0.0}
    assert results["mean_success_rate"] == 0.5
    assert json.loads((tmp_path / "results.json").read_text())["tasks"] == results["tasks"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert "| move_near_reach | 2 | 2 | 100.0% |" in table and "| reach_far | 2 | 0 | 0.0% |" in table
    assert table[-1] == "| **mean** | | | 50.0% |"

    near = envs["move_near_reach"]
    assert near.reset_calls == [
        (7, {"obj_init_options": {"episode_id": 0}}),
        (8, {"obj_init_options": {"episode_id": 1}}),
    ]
    assert envs["reach_far"].reset_calls == [(7, {}), (8, {})]
    # 8 moving steps, then the still step that predicts termination: 9 actions, all numerically as expected
    chunks = reach_chunks(TARGET / 8)
    rows = [chunks[t // 4][t % 4] for t in range(9)]
    np.testing.assert_allclose(np.stack(near.received[-9:]), np.stack([expected_command(z) for z in rows]), atol=1e-12)
    np.testing.assert_allclose(near.pos, TARGET, atol=1e-12)

    record = json.loads((tmp_path / "move_near_reach" / "episode_001.json").read_text())
    assert record["task"] == "move_near_reach" and record["episode"] == 1 and record["seed"] == 8
    assert record["steps"] == 9 and record["success"] is True and record["end_reason"] == "policy_terminate"
    assert record["instruction"] == "reach the target" and record["sampler_calls"] == 3
    np.testing.assert_allclose(record["actions"]["max"], np.stack(near.received[-9:]).max(0))
    far = json.loads((tmp_path / "reach_far" / "episode_000.json").read_text())
    assert far["success"] is False and far["steps"] == 9

    frames = decode_frames(tmp_path / "move_near_reach" / record["video"])
    assert len(frames) == 10 and frames[0].shape == (H, W, 3)
    assert np.abs(frames[-1].astype(int) - near.images[-1]).mean() < 8  # lossy, but the same picture


def test_wrong_actions_fail_and_max_steps_ends_episode(tmp_path):
    envs = {"reach": ReachEnv(TARGET)}
    wrong = ChunkPolicy(ReplaySampler(reach_chunks(-TARGET / 8)), STATS, PolicyConfig(image_size=(H, W)))
    cfg = SimplerConfig(tasks=("reach",), episodes_per_task=1, out_dir=str(tmp_path / "a"), save_video=False)
    assert run_simpler(wrong, cfg, make_env=envs.__getitem__, image_fn=overhead)["tasks"]["reach"]["successes"] == 0
    never_stops = ChunkPolicy(ConstantSampler(np.zeros((4, 7))), STATS, PolicyConfig(image_size=(H, W)))
    cfg = SimplerConfig(tasks=("reach",), episodes_per_task=1, max_steps=5, out_dir=str(tmp_path / "b"))
    run_simpler(never_stops, cfg, make_env=envs.__getitem__, image_fn=overhead)
    record = json.loads((tmp_path / "b" / "reach" / "episode_000.json").read_text())
    assert record["steps"] == 5 and record["end_reason"] == "max_steps" and record["sampler_calls"] == 2


def test_long_horizon_task_advances_subtask_instead_of_stopping(tmp_path):
    env = TwoStageEnv(2 * TARGET)
    sampler = ReplaySampler(reach_chunks(TARGET / 8))
    policy = ChunkPolicy(sampler, STATS, PolicyConfig(image_size=(H, W)))
    cfg = SimplerConfig(tasks=("two_stage",), episodes_per_task=1, out_dir=str(tmp_path), save_video=False)
    results = run_simpler(policy, cfg, make_env=lambda task: env, image_fn=overhead)
    record = json.loads((tmp_path / "two_stage" / "episode_000.json").read_text())
    assert env.advanced_at == 8  # the first predicted termination (step 9) advanced the subtask
    assert record["instructions"] == ["open drawer", "place apple"] and record["steps"] == 18
    assert [instruction for _, instruction in sampler.calls] == ["open drawer"] * 3 + ["place apple"] * 3
    assert record["success"] is True and results["tasks"]["two_stage"]["success_rate"] == 1.0


def test_reset_options_follow_visual_matching():
    assert reset_options("google_robot_move_near", 61) == {"obj_init_options": {"episode_id": 1}}
    grid = [
        reset_options("google_robot_place_apple_in_closed_top_drawer", i)["obj_init_options"]["init_xy"]
        for i in range(9)
    ]
    assert sorted({x for x, _ in grid}) == pytest.approx([-0.08, -0.05, -0.02])
    assert sorted({y for _, y in grid}) == pytest.approx([-0.02, 0.03, 0.08])
    assert reset_options("google_robot_open_top_drawer", 3) == {}
    assert len(SimplerConfig(all_google_tasks=True).task_list()) == 11


def test_vulkan_check_reads_icd_manifests(tmp_path, monkeypatch):
    monkeypatch.delenv("VK_ICD_FILENAMES", raising=False)
    monkeypatch.delenv("VK_DRIVER_FILES", raising=False)
    no_tool = "no-such-vulkaninfo-binary"
    assert find_vulkan_device([str(tmp_path)], no_tool) is None
    (tmp_path / "lvp_icd.x86_64.json").write_text("{}")  # lavapipe: a CPU rasteriser, not a GPU
    assert find_vulkan_device([str(tmp_path)], no_tool) is None
    with pytest.raises(SimplerUnavailableError, match="no Vulkan GPU"):
        preflight([str(tmp_path)], no_tool)
    (tmp_path / "nvidia_icd.json").write_text("{}")
    assert str(tmp_path / "nvidia_icd.json") in find_vulkan_device([str(tmp_path)], no_tool)


needs_no_simpler_env = pytest.mark.skipif(
    importlib.util.find_spec("simpler_env") is not None, reason="simpler_env is installed on this machine"
)


@needs_no_simpler_env
def test_preflight_names_simpler_env():
    with pytest.raises(SimplerUnavailableError, match="simpler_env") as err:
        preflight()
    assert "SimplerEnv" in str(err.value) and "pip install" in str(err.value)


@needs_no_simpler_env
def test_main_eval_simpler_exits_nonzero_before_building_the_policy(tmp_path, capsys):
    built = []
    status = main_eval_simpler(SimplerConfig(out_dir=str(tmp_path)), make_policy=lambda: built.append(1))
    assert status == 2 and built == []
    assert "simpler_env" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
