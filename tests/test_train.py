"""Training through real DeepSpeed on CPU (gloo): ZeRO-2/3 on 1 and 2 processes, EMA, exact resume,
non-finite losses, a damaged checkpoint on one of two ranks, export, and MLflow against a real server."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from hostile import flip_bit
from mlflow_server import mlflow_server_fixture  # noqa: F401
from safetensors.torch import load_file
from train_runs import REPO, TINY, TRACE_KEYS, launch, launch_two_nodes, metrics, torchrun, trace

from selfflow.config import load_config
from selfflow.flow.samplers import SamplerConfig, sample
from selfflow.training import checkpoints
from selfflow.training.engine import consolidated_student
from selfflow.training.export import export, load_export
from selfflow.training.train import TrainConfig, draw_modality


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    """Uninterrupted reference: 2 processes, ZeRO-2, 12 steps, checkpoints every 6."""
    run_dir = tmp_path_factory.mktemp("z2") / "run"
    launch(2, run_dir, "steps=12", "save_every=6")
    return run_dir


def test_zero2_two_processes_trains(zero2_run):
    rows = metrics(zero2_run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {m for r in rows for m in r if m.startswith("loss/")} == {"loss/image", "loss/video", "loss/audio"}
    first, last = (sum(r["rep"] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    assert last < first - 0.05  # the student learns to predict the teacher's features (cosine rises)
    assert [p.name for p in sorted(checkpoints.checkpoint_root(zero2_run).glob("step_*"))] == [
        "step_00000006",
        "step_00000012",
    ]
    assert (checkpoints.checkpoint_root(zero2_run) / "latest").read_text().strip() == "step_00000012"


def test_zero3_matches_zero2_with_unused_modality_parameters(zero2_run, tmp_path):
    """Each step trains one modality; the others' projections must not keep stale gradients."""
    run_dir = tmp_path / "z3"
    launch(2, run_dir, "steps=12", "save_every=12", "deepspeed.zero_stage=3")
    ours, reference = metrics(run_dir), metrics(zero2_run)
    for a, b in zip(ours, reference, strict=True):
        for key in TRACE_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)

    # one process continues the two's ZeRO-3 checkpoint; its EMA carries over whole and keeps updating
    one = launch(1, run_dir, "steps=13", "save_every=13", "deepspeed.zero_stage=3")
    assert "at step 12 (saved by 2 processes, continued by 1)" in one.stdout + one.stderr
    before, after = (checkpoints.checkpoint_dir(run_dir, step) for step in (12, 13))
    ema12, ema13 = load_file(before / "ema.safetensors"), load_file(after / "ema.safetensors")
    student13, decay = consolidated_student(after), load_config(TrainConfig, TINY).ema.decay
    for name, value in ema13.items():  # the textbook update from the loaded EMA and the step-13 student
        expected = decay * ema12[name] + (1 - decay) * student13[name]
        assert torch.allclose(value, expected, rtol=0, atol=1e-6), name
    assert metrics(run_dir)[-1]["step"] == 13


def test_resume_reproduces_uninterrupted_loss_trace(zero2_run, tmp_path, mlflow_store):
    run_dir = tmp_path / "resumed"
    launch(2, run_dir, "steps=6", "save_every=6")
    launch(2, run_dir, "steps=12", "save_every=6")
    assert trace(metrics(run_dir)) == trace(metrics(zero2_run))  # bit for bit, every logged term
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store)
    runs = client.search_runs(client.get_experiment_by_name("selfflow").experiment_id)
    assert len(runs) == 1  # the resumed job continued the same MLflow run
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 13))


def test_two_nodes_on_loopback_train_save_and_resume_as_one_node_of_two(zero2_run, tmp_path):
    """Two torchrun "nodes" (`--nnodes 2 --node-rank 0/1`, rendezvous on 127.0.0.1, one process each,
    gloo, ZeRO-2) train 6 steps, save, and a second launch resumes to 12: the loss trace equals the
    single-node 2-process run's bit for bit (rank = node, so every random draw is the same)."""
    run_dir = tmp_path / "nodes"
    launch_two_nodes(run_dir, "steps=6", "save_every=6")
    assert checkpoints.verify(checkpoints.checkpoint_dir(run_dir, 6))["world_size"] == 2
    resumed = launch_two_nodes(run_dir, "steps=12", "save_every=6")
    assert "resumed from" in resumed[0].stdout + resumed[0].stderr
    assert trace(metrics(run_dir)) == trace(metrics(zero2_run))


def test_one_ranks_damaged_file_makes_both_ranks_resume_from_the_previous_checkpoint(zero2_run, tmp_path):
    run_dir = tmp_path / "damaged"
    shutil.copytree(zero2_run, run_dir)
    damaged = checkpoints.checkpoint_dir(run_dir, 12) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    flip_bit(damaged)
    resumed = launch(2, run_dir, "steps=12", "save_every=6")
    said = resumed.stdout + resumed.stderr
    assert f"refusing checkpoint {damaged.parent}: rank 1: {damaged.name} differs from the manifest" in said, said[
        -3000:
    ]
    assert said.count("resumed from") == 1 and "at step 6" in said  # one decision, taken by both ranks
    assert trace(metrics(run_dir)) == trace(metrics(zero2_run))  # steps 7-12 again, bit for bit
    assert checkpoints.verify(checkpoints.checkpoint_dir(run_dir, 12))["world_size"] == 2

    # a job of 1 process continues the checkpoint of 2 through DeepSpeed's universal checkpoint
    one = launch(1, run_dir, "steps=14", "save_every=14")
    said = one.stdout + one.stderr
    assert f"resumed from {damaged.parent} at step 12 (saved by 2 processes, continued by 1)" in said, said[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 15)) and all(r["loss"] == r["loss"] for r in rows[-2:])
    assert checkpoints.verify(checkpoints.checkpoint_dir(run_dir, 14))["world_size"] == 1
    assert not (checkpoints.checkpoint_root(run_dir) / "universal" / "step_00000012").exists()  # the copy went
    assert checkpoints.verify(checkpoints.checkpoint_dir(run_dir, 12))["world_size"] == 2  # the original stays


@pytest.mark.parametrize(("stage", "saved", "resumed"), [(2, 2, 1), (2, 1, 2), (3, 2, 1), (3, 1, 2), (0, 2, 1)])
def test_a_checkpoint_resumes_on_another_number_of_processes(stage, saved, resumed, tmp_path):
    """Weights equal bit for bit after the load, and the next step on the same global batch equals the
    saving job's next step within float round-off (so Adam's moments and step count came across)."""
    script = str(REPO / "tests" / "distributed" / "resize_check.py")
    for phase, nproc in (("save", saved), ("load", resumed)):
        proc = torchrun(nproc, script, phase, str(stage), str(tmp_path))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"zero-{stage}: loaded weights exact True") == resumed, proc.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_ema_equals_independent_ema_on_two_processes(stage):
    proc = torchrun(2, str(REPO / "tests" / "distributed" / "ema_check.py"), str(stage))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"zero-{stage}: max |ema - reference|") == 2


def test_one_process_zero3_with_mlflow_server(tmp_path, mlflow_server):
    run_dir = tmp_path / "tracked"
    launch(1, run_dir, "steps=5", "save_every=5", "deepspeed.zero_stage=3", f"tracking.tracking_uri={mlflow_server}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs(client.get_experiment_by_name("selfflow").experiment_id)
    run = next(r for r in runs if r.data.tags.get("selfflow.run_dir") == str(run_dir.resolve()))
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_size"] == "64" and run.data.params["deepspeed.zero_stage"] == "3"
    for key in ("loss", "fm", "rep", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "data_time"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4, 5], key
    # the wait for the batch is part of the step and was measured (never exactly zero: a batch is made)
    assert all(0 < r["data_time"] < r["step_time"] for r in metrics(run_dir))
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert logged == pytest.approx([r["loss"] for r in metrics(run_dir)])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "checkpoints" in artifacts


def test_non_finite_loss_stop_skip_and_corrupt_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    launch(1, run_dir, "steps=4", "save_every=2")
    poisoned = ["modalities.image.data.item_noise=1e39", "steps=6"]  # inf latents -> inf flow-matching loss

    stopped = launch(1, run_dir, *poisoned, check=False)
    assert stopped.returncode != 0
    found = re.search(r"step (\d+), modality image: loss term fm is not finite", stopped.stderr)
    assert found, stopped.stderr[-2000:]
    assert metrics(run_dir)[-1]["step"] == int(found.group(1)) - 1  # logs stop right before the bad step
    assert (checkpoints.checkpoint_root(run_dir) / "latest").read_text().strip() == "step_00000004"
    assert checkpoints.verify(checkpoints.checkpoint_dir(run_dir, 4))["step"] == 4

    # a truncated file in the latest checkpoint is refused by name and the previous one is used
    shutil.copytree(run_dir, tmp_path / "corrupt")
    model_file = next(checkpoints.checkpoint_dir(tmp_path / "corrupt", 4).glob("*model_states.pt"))
    model_file.write_bytes(model_file.read_bytes()[:100])
    fallback = launch(1, tmp_path / "corrupt", "steps=5", "save_every=100")
    said = fallback.stdout + fallback.stderr
    assert re.search(r"refusing checkpoint \S*step_00000004: mp_rank_00_model_states\.pt has 100 bytes", said), said
    assert f"resumed from {checkpoints.checkpoint_dir(tmp_path / 'corrupt', 2)} at step 2" in said
    assert (checkpoints.checkpoint_root(tmp_path / "corrupt") / "refused" / "step_00000004").is_dir()  # kept aside

    skipped = launch(1, run_dir, *poisoned, "nan_policy=skip")
    resumed = metrics(run_dir)[-2:]  # the skip run resumed at step 4 and logged steps 5 and 6
    assert [r["step"] for r in resumed] == [5, 6]
    n_nan = sum(1 for r in resumed if r["loss"] != r["loss"])
    assert n_nan >= 1 and resumed[-1]["skipped"] == n_nan
    assert "skipping step" in skipped.stdout + skipped.stderr

    # a diverged run does not skip on forever: it stops after max_skips_in_a_row non-finite steps in a row
    every_step = ["modalities.video.data.item_noise=1e39", "modalities.audio.data.item_noise=1e39"]
    diverged = launch(
        1, run_dir, *poisoned, *every_step, "steps=12", "nan_policy=skip", "max_skips_in_a_row=3", check=False
    )
    assert diverged.returncode == 2
    assert re.search(r"step 9, modality \w+: loss term fm is not finite; 3 steps in a row", diverged.stderr), (
        diverged.stderr
    )
    assert (checkpoints.checkpoint_root(run_dir) / "latest").read_text().strip() == "step_00000006"


def test_export_loads_without_deepspeed_and_samples(zero2_run, tmp_path):
    out = export(zero2_run, tmp_path / "tiny.safetensors", student=True)
    model, meta = load_export(out)
    assert meta["step"] == "12" and meta["weights"] == "ema"
    student, _ = load_export(tmp_path / "tiny.student.safetensors")
    ema_diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), student.parameters(), strict=True))
    assert ema_diff > 0  # EMA and online weights are different files
    ids = torch.zeros(2, 16, 4, dtype=torch.long)
    ids[..., 1], ids[..., 2] = torch.arange(16) // 4, torch.arange(16) % 4
    y = torch.tensor([1, 2])
    out = sample(
        lambda x, t, labels: model(x, t, ids, y=labels),
        torch.randn(2, 16, 16),
        y,
        SamplerConfig(kind="euler", num_steps=4),
    )
    assert out.shape == (2, 16, 16) and torch.isfinite(out).all()


def test_flow_matching_baseline_on_zero0_with_grad_accum_and_student_export(tmp_path):
    run_dir = tmp_path / "fm"
    launch(
        1, run_dir, "steps=4", "save_every=4", "objective.method=fm", "deepspeed.zero_stage=0", "deepspeed.grad_accum=2"
    )
    rows = metrics(run_dir)
    assert len(rows) == 4 and all(r["rep"] == 0.0 for r in rows)
    cfg = load_config(TrainConfig, TINY)
    for row in rows:  # both micro-batches of an optimizer step are of the step's one modality
        assert [k for k in row if k.startswith("loss/")] == [f"loss/{draw_modality(cfg, row['step'] - 1)}"]
    export(run_dir, tmp_path / "fm.safetensors", student=True)
    student, meta = load_export(tmp_path / "fm.student.safetensors")
    assert meta["weights"] == "student"


def test_repa_aligns_to_a_local_transformers_encoder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    encoder = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=4,
            image_size=16,
        )
    )
    encoder.save_pretrained(tmp_path / "dinov2")
    run_dir = tmp_path / "repa"
    pixels_image = ["model.modalities.image=[12, 12]", "modalities.image.data.channels=12", "model.projector_dim=32"]
    launch(
        1,
        run_dir,
        "steps=6",
        "save_every=6",
        "objective.method=repa",
        f"objective.repa_encoder={tmp_path / 'dinov2'}",
        "objective.repa_skip=[video, audio]",  # flow matching on these is explicit, never a silent switch
        *pixels_image,
    )
    rows = metrics(run_dir)
    image_rows = [r for r in rows if "loss/image" in r]
    other_rows = [r for r in rows if "loss/image" not in r]
    assert image_rows and other_rows
    assert all(r["rep"] != 0.0 for r in image_rows)  # aligned to the encoder on images
    assert all(r["rep"] == 0.0 for r in other_rows)  # video and audio train plain flow matching
