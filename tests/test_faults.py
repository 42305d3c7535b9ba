"""Fault injection on real training runs (README "What happens when things go wrong").

Real SIGKILLs at named moments (`SELFFLOW_FAULT`, faults.fault_point) and at an arbitrary one, code
hidden in pickles given to every path that reads weights, bit flips in every kind of checkpoint
file, a changed model, a full disk (a small tmpfs in a user namespace), corrupt and missing data.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hostile import flip_bit, write_evil_pickle
from safetensors.torch import load_file
from train_runs import REPO, TINY, launch, metrics, trace

from selfflow.cli import main
from selfflow.files import file_sha256
from selfflow.training import checkpoints
from selfflow.training.engine import consolidated_student, restricted_unpickling
from selfflow.training.export import export

QUIET = ["tracking.enabled=false"]


def assert_checkpoints_whole(run_dir: Path) -> None:
    """`latest` names a sealed checkpoint that verifies, and so does every sealed folder."""
    latest = checkpoints.checkpoint_root(run_dir) / "latest"
    if latest.exists():
        assert checkpoints.verify(checkpoints.checkpoint_root(run_dir) / latest.read_text().strip())
    for folder in checkpoints.step_folders(run_dir):
        if (folder / checkpoints.MANIFEST).exists():
            assert checkpoints.verify(folder)["step"] == int(folder.name[5:])


def train_env(fault: str | None = None) -> dict:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DS_ACCELERATOR": "cpu"}
    env.pop("SELFFLOW_FAULT", None)
    return {**env, "SELFFLOW_FAULT": fault} if fault else env


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "selfflow.cli", "train", "--config", str(TINY), f"run_dir={run_dir}", *overrides]


def in_process(*args: str) -> int:
    """`selfflow ...` in this process (DeepSpeed's start-up once, not per run)."""
    return main([*args])


# --------------------------------------------------------------------------------------------
# kill -9


def test_kill_nine_at_six_moments_then_resume_equals_the_uninterrupted_run(tmp_path):
    base = ["steps=12", "save_every=2", "keep_checkpoints=3", *QUIET]
    reference = tmp_path / "reference"
    launch(1, reference, *base)
    run_dir = tmp_path / "killed"
    faults = [
        "step.after_optimizer@3",  # between steps: the row of step 3 is never written
        "save.after_engine@4",  # during a save: DeepSpeed's files written, the EMA not yet
        "save.before_seal@6",  # during a save: every file written and hashed, no manifest yet
        "save.after_seal@8",  # the manifest written, `latest` not moved yet
        "resume.after_load@8",  # right after a resume
        "step.after_metrics@9",  # the row written, no checkpoint of it
    ]
    for fault in faults:
        proc = subprocess.run(train_cmd(run_dir, *base), env=train_env(fault), capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-3000:])
        assert_checkpoints_whole(run_dir)
    # the sixth kill: from outside, at whatever moment the process is in when step 10's row appears
    proc = subprocess.Popen(
        train_cmd(run_dir, *base), env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["step"] >= 10 for r in safe_rows(run_dir)):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert_checkpoints_whole(run_dir)

    launch(1, run_dir, *base)  # the same command, to the end
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))  # exactly one row per step
    assert trace(rows) == trace(metrics(reference))  # bit for bit, every logged term
    final, ref = checkpoints.checkpoint_dir(run_dir, 12), checkpoints.checkpoint_dir(reference, 12)
    ours, theirs = load_file(str(final / "ema.safetensors")), load_file(str(ref / "ema.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    student, student_ref = consolidated_student(final), consolidated_student(ref)
    assert all(torch.equal(student[k], student_ref[k]) for k in student_ref)
    refused = sorted(p.name for p in (checkpoints.checkpoint_root(run_dir) / "refused").iterdir() if p.is_dir())
    assert {"step_00000004", "step_00000006"} <= set(refused)  # unfinished saves are kept aside, not deleted
    assert [p.name for p in checkpoints.step_folders(run_dir)] == ["step_00000012", "step_00000010", "step_00000008"]


def safe_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            rows.append(json.loads(line))
    return rows


# --------------------------------------------------------------------------------------------
# Damaged checkpoints, a changed model


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """A finished run: checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    launch(1, run_dir, "steps=4", "save_every=2", *QUIET)
    return run_dir


FILES = {
    "model states": "mp_rank_00_model_states.pt",
    "optimizer": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "EMA": "ema.safetensors",
    "state": "state.json",
    "config": "config.yaml",
}


@pytest.mark.parametrize("kind", [*FILES, "manifest"])
def test_a_flipped_bit_in_any_checkpoint_file_falls_back_to_the_previous_one(four_steps, tmp_path, capsys, kind):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    bad = checkpoints.checkpoint_dir(run_dir, 4)
    if kind == "manifest":
        text = (bad / checkpoints.MANIFEST).read_text()
        (bad / checkpoints.MANIFEST).write_text(text.replace('"files"', '"filez"'))
        reason = "COMPLETE is damaged"
    else:
        flip_bit(bad / FILES[kind])
        reason = f"{FILES[kind]} differs from the manifest"
    assert in_process("train", "--config", str(TINY), f"run_dir={run_dir}", "steps=5", "save_every=2", *QUIET) == 0
    said = capsys.readouterr()
    assert f"refusing checkpoint {bad}: {reason}" in said.out + said.err
    assert f"resumed from {checkpoints.checkpoint_dir(run_dir, 2)} at step 2" in said.out + said.err
    assert trace(metrics(run_dir))[:4] == trace(metrics(four_steps))  # steps 3 and 4 again, the same
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5]
    kept = checkpoints.checkpoint_root(run_dir) / "refused" / "step_00000004"
    assert kept.is_dir() and {p.name for p in kept.iterdir()} == {
        p.name for p in (four_steps / bad.relative_to(run_dir)).iterdir()
    }
    assert checkpoints.verify(checkpoints.checkpoint_dir(run_dir, 5))["step"] == 5
    assert (checkpoints.checkpoint_root(run_dir) / "latest").read_text().strip() == "step_00000005"


def test_a_changed_model_is_refused_by_name_and_nothing_is_lost(four_steps, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    before = {p: file_sha256(p) for p in run_dir.rglob("*") if p.is_file()}
    wider = ["model.hidden_size=96", "model.projector_dim=96", "model.axes_dim=[8, 8, 8]", "steps=6"]
    assert in_process("train", "--config", str(TINY), f"run_dir={run_dir}", *wider, *QUIET) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints, none of which can be resumed" in err
    for step in (4, 2):
        assert f"step_0000000{step}: ema.safetensors: " in err and "(a changed model config?)" in err
    assert "resume=false" in err
    assert {p: file_sha256(p) for p in run_dir.rglob("*") if p.is_file()} == before  # not one byte changed

    # starting over is explicit, and moves the old run aside instead of deleting it
    assert in_process("train", "--config", str(TINY), f"run_dir={run_dir}", *wider, "resume=false", *QUIET) == 0
    (previous,) = (run_dir / "previous").iterdir()
    assert checkpoints.verify(previous / "checkpoints" / "step_00000004")["step"] == 4
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 7))


# --------------------------------------------------------------------------------------------
# Code in pickles


def planted_run(four_steps: Path, tmp_path: Path, marker: Path, forge_manifest: bool) -> Path:
    """A copy of the run whose newest model-states file runs code when unpickled (with the manifest
    rewritten to match it when `forge_manifest`: an attacker who can write the folder can do that)."""
    run_dir = tmp_path / ("forged" if forge_manifest else "planted")
    shutil.copytree(four_steps, run_dir)
    folder = checkpoints.checkpoint_dir(run_dir, 4)
    target = folder / "mp_rank_00_model_states.pt"
    with restricted_unpickling():  # the run's own file, read as selfflow reads it
        real = torch.load(target, map_location="cpu", weights_only=True)
    write_evil_pickle(target, marker, real)
    if forge_manifest:
        manifest = json.loads((folder / checkpoints.MANIFEST).read_text())
        manifest["files"][target.name] = checkpoints.hash_file(target)
        (folder / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    return run_dir


@pytest.mark.parametrize("forge_manifest", [False, True], ids=["planted", "planted_with_forged_manifest"])
def test_a_planted_pickle_in_a_run_folder_never_runs(four_steps, tmp_path, capsys, forge_manifest):
    marker = tmp_path / "pwned"
    run_dir = planted_run(four_steps, tmp_path, marker, forge_manifest)
    why = "refusing to unpickle" if forge_manifest else r"mp_rank_00_model_states.pt has \d+ bytes, the manifest says"
    with pytest.raises(ValueError, match=why):
        export(run_dir, tmp_path / "out.safetensors", checkpoints.checkpoint_dir(run_dir, 4), student=True)
    assert in_process("train", "--config", str(TINY), f"run_dir={run_dir}", "steps=5", *QUIET) == 0
    said = capsys.readouterr()
    assert re.search(f"refusing checkpoint {checkpoints.checkpoint_dir(run_dir, 4)}: .*{why}", said.out), said.out
    assert f"resumed from {checkpoints.checkpoint_dir(run_dir, 2)} at step 2" in said.out
    assert not marker.exists()


def test_a_pickle_given_as_weights_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pt"
    write_evil_pickle(evil, marker, {"ema": {"x_embedder.proj.weight": torch.zeros(1)}})
    sample = ["sample", "--config", "configs/sample/tiny.yaml", f"checkpoint={evil}", f"out_dir={tmp_path / 's'}"]
    assert in_process(*sample) == 2
    assert f"refusing to unpickle {evil}" in capsys.readouterr().err
    assert in_process("eval", f"checkpoint={evil}", f"out_dir={tmp_path / 'e'}") == 2
    assert f"{evil} is not a safetensors file" in capsys.readouterr().err
    finetune = ["robotics", "finetune", "--config", "configs/robotics/finetune_tiny.yaml", f"init={evil}"]
    assert in_process(*finetune, f"run_dir={tmp_path / 'f'}", *QUIET) == 2
    assert f"refusing to unpickle {evil}" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()  # refused before anything started
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Disk, data


def test_a_full_disk_says_so_and_keeps_the_earlier_checkpoint(tmp_path):
    """The checkpoints folder is a 16 MiB tmpfs (a user namespace): the first checkpoint (about 10 MB)
    fits, the second does not."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    (run_dir / "checkpoints").mkdir(parents=True)
    cmd = " ".join(train_cmd(run_dir, "steps=4", "save_every=2", *QUIET))
    script = (
        f"mount -t tmpfs -o size=16m tmpfs {run_dir / 'checkpoints'} && {cmd}; echo rc=$?; "
        f"cp -r {run_dir / 'checkpoints'} {out}"
    )
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        env=train_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert "rc=2" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "No space left on device" in proc.stderr and str(run_dir / "checkpoints" / "step_00000004") in proc.stderr
    assert checkpoints.verify(out / "step_00000002")["step"] == 2
    assert (out / "latest").read_text().strip() == "step_00000002"
    assert not (out / "step_00000004" / checkpoints.MANIFEST).exists()


def test_missing_data_stops_before_anything_starts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = in_process(
        "train", "--config", str(TINY), f"run_dir={run_dir}", f"modalities.image.shards={tmp_path / 'nope'}"
    )
    said = capsys.readouterr()
    assert code == 2 and f"no latent shards (*.tar) found at {tmp_path / 'nope'}" in said.err
    assert "model parameters" not in said.out and not run_dir.exists()  # no DeepSpeed, no MLflow run


def test_a_folder_of_corrupt_samples_stops_naming_it_and_the_mlflow_run_fails(tmp_path, capsys, mlflow_store):
    import webdataset as wds

    shards = tmp_path / "corrupt"
    shards.mkdir()
    with wds.TarWriter(str(shards / "latent-000000.tar")) as tar:
        for i in range(20):
            tar.write({"__key__": f"s{i:03d}", "latent.pth": b"not a tensor", "json": b"{}"})
    run_dir = tmp_path / "run"
    only_image = ["modalities.video=null", "modalities.audio=null", "modalities.image.probability=1"]
    data = [f"modalities.image.shards={shards}", "modalities.image.max_bad_samples=7"]
    data += ["modalities.image.timesteps.distribution=logit_normal"]  # no manifest.json to resolve "auto" from
    assert in_process("train", "--config", str(TINY), f"run_dir={run_dir}", *only_image, *data) == 2
    err = capsys.readouterr().err
    assert f"7 corrupt samples or shards in a row in {shards}" in err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store)
    (run,) = client.search_runs(client.get_experiment_by_name("selfflow").experiment_id)
    assert run.info.status == "FAILED"
