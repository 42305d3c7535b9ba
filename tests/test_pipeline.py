"""The built-in data path end to end: synth -> prepare -> train on latent shards -> exact resume."""

import pytest
from train_runs import REPO, launch, metrics, trace

from selfflow.cli import main

SMALL = ["num_images=48", "num_videos=24", "num_audio=24", "samples_per_shard=16"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    assert main(["synth", "--config", "configs/data/synth.yaml", f"out_dir={root / 'raw'}", *SMALL]) == 0
    args = [
        "prepare",
        "--config",
        "configs/data/prepare_tiny.yaml",
        f"raw_dir={root / 'raw'}",
        f"out_dir={root / 'lat'}",
    ]
    assert main(args) == 0
    return root / "lat"


def shards(latents) -> list[str]:
    return [f"modalities.{m}.shards={latents / m}" for m in ("image", "video", "audio")]


def test_train_on_prepared_shards_resumes_exactly(latents, tmp_path):
    config = REPO / "configs" / "train" / "tiny_synth.yaml"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    launch(1, whole, "steps=8", "save_every=4", *shards(latents), config=config)
    launch(1, parts, "steps=4", "save_every=4", *shards(latents), config=config)
    launch(1, parts, "steps=8", "save_every=4", *shards(latents), config=config)
    rows = metrics(whole)
    assert trace(metrics(parts)) == trace(rows)  # loader positions restore the same batches
    seen = {key.split("/")[1] for r in rows for key in r if key.startswith("loss/")}
    assert seen == {"image", "video", "audio"}
    assert all(r["loss"] == r["loss"] for r in rows)  # finite
