"""The robotics stage end to end on this machine: episodes in the real RT-1 on-disk format ->
`selfflow robotics convert` -> finetune a tiny pretrained trunk for a few steps -> the finetuned
trunk as a policy in a small environment with SIMPLER's API -> success rates in the report."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_runs import REPO, launch, torchrun

from selfflow.backbone.checkpoint import load_export
from selfflow.cli import main
from selfflow.config import load_config
from selfflow.robotics.agent import EvalSimplerConfig, make_policy
from selfflow.robotics.clips import ClipDataConfig, ClipStream
from selfflow.robotics.finetune import FinetuneConfig, init_model
from selfflow.robotics.policy import PolicyConfig
from selfflow.robotics.rt1 import Episode, write_episode_record, write_tfrecord
from selfflow.robotics.simpler import SimplerConfig, run_simpler
from selfflow.training.objective import ObjectiveConfig

STEPS = 8


def jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), colour).save(buf, format="JPEG")
    return buf.getvalue()


def episode(i: int) -> Episode:
    rng = np.random.default_rng(i)
    terminate = np.zeros((STEPS, 3), np.float32)
    terminate[:, 1] = 1
    return Episode(
        frames=[jpeg((20 * t, 100, 40 * i)) for t in range(STEPS)],
        instruction=f"move the can {i}",
        actions={
            "world_vector": rng.normal(0, 0.05, (STEPS, 3)).astype(np.float32),
            "rotation_delta": rng.normal(0, 0.02, (STEPS, 3)).astype(np.float32),
            "gripper_closedness_action": rng.uniform(-1, 1, (STEPS, 1)).astype(np.float32),
            "terminate_episode": terminate,
        },
        is_first=np.arange(STEPS) == 0,
        is_last=np.arange(STEPS) == STEPS - 1,
        is_terminal=np.arange(STEPS) == STEPS - 1,
        metadata={"aspects/success": i != 2},
    )


class ReachEnv:
    """SIMPLER's environment API in miniature: the end effector integrates world_vector; success when
    it ends within `radius` of the target."""

    def __init__(self, radius: float):
        self.radius = radius

    def reset(self, options=None, seed=None):
        self.pos, self.t = np.zeros(3), 0
        return self.obs(), {}

    def obs(self):
        return {"image": np.full((32, 40, 3), 10 * self.t % 255, np.uint8)}

    def get_language_instruction(self):
        return "move the can 0"

    def step(self, action):
        assert np.asarray(action).shape == (7,)
        self.pos, self.t = self.pos + np.asarray(action[:3]), self.t + 1
        success = bool(np.linalg.norm(self.pos - np.array([0.01, 0.0, 0.0])) < self.radius)
        return self.obs(), 0.0, False, self.t >= 4, {"success": success}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("rt1")
    write_tfrecord(root / "fractal.tfrecord-00000-of-00001", [write_episode_record(episode(i)) for i in range(3)])
    args = [f"input={root}", f"out_dir={root / 'clips'}", "future_frames=2", "action_horizon=2", "success_only=true"]
    assert main(["robotics", "convert", "--config", str(REPO / "configs/robotics/rt1_convert.yaml"), *args]) == 0
    return root / "clips"


def test_convert_keeps_successful_episodes_as_clips(clips):
    summary = json.loads((clips / "summary.json").read_text())
    # 2 successful episodes of 8 steps; anchors t = 0 .. 8 - 1 - 2 with one context frame
    assert summary["episodes_kept"] == 2 and summary["clips_written"] == 2 * (STEPS - 2)
    stream = ClipStream(ClipDataConfig(shards=str(clips)), FinetuneConfig().model, batch_size=3, seed=0)
    clip = stream.next_batch()
    assert clip.context.shape == (3, 20, 192) and clip.future.shape == (3, 40, 192) and clip.actions.shape == (3, 2, 7)
    assert clip.ids_actions[0, :, 0].tolist() == [0, 1]  # action k after observing frame 0 + k


def test_finetune_from_a_pretrained_export_then_act_in_an_environment(clips, tmp_path):
    pretrain = tmp_path / "pretrain"
    video = ["model.modalities.video=[192,192]", "modalities.video.data.channels=192"]
    launch(1, pretrain, "steps=2", "save_every=2", "tracking.enabled=false", *video)
    export = tmp_path / "pretrained.safetensors"
    assert main(["export", "--run", str(pretrain), "--out", str(export)]) == 0

    # every pretrained tensor is loaded; only the action projections start fresh
    preset = REPO / "configs/robotics/finetune_tiny.yaml"
    cfg = load_config(FinetuneConfig, preset, [f"init={export}", f"data.shards={clips}"])
    model, pretrained = init_model(cfg), load_file(str(export))
    own = model.state_dict()
    assert set(own) - set(pretrained) == {"act_in.weight", "final_layer.act_linear.weight"}
    assert all(torch.equal(own[k], v) for k, v in pretrained.items())

    run = tmp_path / "robot"
    overrides = [f"init={export}", f"data.shards={clips}", f"run_dir={run}", "steps=3", "save_every=3"]
    dist_env = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: os.environ.get(k) for k in dist_env}
    assert main(["robotics", "finetune", "--config", str(preset), *overrides]) == 0
    assert {k: os.environ.get(k) for k in dist_env} == env  # no RANK / MASTER_PORT left for later jobs
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) and r["rep"] != 0 for r in rows)
    assert all(0 < r["data_time"] < r["step_time"] for r in rows)  # the clip stream's wait, inside the step
    finetuned = tmp_path / "robot.safetensors"
    assert main(["export", "--run", str(run), "--out", str(finetuned)]) == 0
    assert "act_in.weight" in load_export(finetuned)[0].state_dict()

    policy = make_policy(
        EvalSimplerConfig(
            checkpoint=str(finetuned),
            data=ClipDataConfig(shards=str(clips)),
            future_frames=2,
            sampling_steps=2,
            policy=PolicyConfig(action_horizon=2, image_size=(32, 40)),
            device="cpu",
        )
    )
    out = tmp_path / "simpler"
    cfg = SimplerConfig(tasks=("reach_near", "reach_far"), episodes_per_task=2, max_steps=6, out_dir=str(out))
    radius = {"reach_near": 1e3, "reach_far": 1e-9}  # any action succeeds near, none far
    results = run_simpler(policy, cfg, make_env=lambda task: ReachEnv(radius[task]), image_fn=lambda env, o: o["image"])
    assert results["tasks"]["reach_near"]["success_rate"] == 1 and results["tasks"]["reach_far"]["success_rate"] == 0
    assert policy.sampler.calls > 0 and (out / "reach_near").is_dir()

    report = tmp_path / "report"
    assert main(["report", f"runs=[{out}]", f"out_dir={report}", "mlflow=false"]) == 0
    markdown = (report / "report.md").read_text()
    assert "| simpler | reach_near | 2 | 2 | 100.0% |" in markdown and "| simpler | mean |  |  | 50.0% |" in markdown


def clip_contents(folder) -> dict[str, tuple]:
    import webdataset as wds

    out = {}
    for shard in sorted(folder.glob("*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            out[s["__key__"]] = (s["actions.npy"], s["ctx00.jpg"], s["json"])
    return out


def test_convert_on_two_processes_equals_one_and_clips_stream_with_exact_resume(tmp_path):
    """`robotics convert` under torchrun splits the TFRecord files between 2 processes: the same clips,
    byte for byte, and the same action statistics as one process. The clip stream then deals the
    shards out to 2 ranks (no clip on both), and a stream rebuilt at a position continues exactly."""

    for f in range(4):  # 4 files of 2 episodes (episode 2 fails and is filtered)
        records = [write_episode_record(episode(2 * f + e)) for e in range(2)]
        write_tfrecord(tmp_path / "rt1" / f"fractal.tfrecord-{f:05d}-of-00004", records)
    args = [
        "robotics",
        "convert",
        "--config",
        str(REPO / "configs/robotics/rt1_convert.yaml"),
        f"input={tmp_path / 'rt1'}",
    ]
    args += ["future_frames=2", "action_horizon=2", "success_only=true", "samples_per_shard=4"]
    assert main([*args, f"out_dir={tmp_path / 'one'}"]) == 0
    proc = torchrun(2, "-m", "selfflow.cli", *args, f"out_dir={tmp_path / 'two'}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = clip_contents(tmp_path / "one"), clip_contents(tmp_path / "two")
    assert len(one) == 7 * (STEPS - 2) and one == two  # 7 successful episodes
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert [s["processes"] for s in summaries] == [1, 2]
    same = [{k: v for k, v in s.items() if k not in ("shards", "processes", "config")} for s in summaries]
    assert same[0] == same[1] and [len(s["shards"]) for s in summaries] == [11, 11]  # 24 + 18 clips on two
    stats = [json.loads((tmp_path / d / "stats.json").read_text()) for d in ("one", "two")]
    for key in ("mean", "std", "min", "max", "q01", "q99"):
        np.testing.assert_allclose(stats[1][key], stats[0][key], rtol=1e-12, atol=1e-15)

    data = ClipDataConfig(shards=str(tmp_path / "one"), shuffle_buffer=4)
    model = FinetuneConfig().model

    def actions(rank, batches, position=0):
        stream = ClipStream(data, model, batch_size=2, seed=0, rank=rank, position=position, world=2)
        assert stream.split == "strict"  # 11 shards of 4 clips for 2 ranks
        return [stream.next_batch().actions for _ in range(batches)]

    seen = {rank: {tuple(a.flatten().tolist()) for b in actions(rank, 10) for a in b} for rank in (0, 1)}
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    uninterrupted = actions(1, 6)
    assert all(torch.equal(a, b) for a, b in zip(actions(1, 2, position=4), uninterrupted[4:], strict=True))


def test_finetuning_refuses_a_contrastive_weight_it_would_ignore():
    """Delta-FM is a pretraining term; the video-action loss has none, so setting it is a config error."""
    with pytest.raises(ValueError, match="contrastive_weight"):
        FinetuneConfig(objective=ObjectiveConfig(student_layer=1, teacher_layer=3, contrastive_weight=0.05))
    assert FinetuneConfig(objective=ObjectiveConfig(student_layer=1, teacher_layer=3)).objective.contrastive_weight == 0
