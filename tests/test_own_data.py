"""A new user's path, with the README's commands: a folder of captioned files -> pack -> prepare ->
train -> export (a shareable model folder) -> generate from a prompt -> from_pretrained.

The folder is written here (PNG files with sidecar captions). Checks are independent of the code
under test where they can be: exported weights against the run's own EMA file, sizes against the
pack settings, token widths against patch x channels, reproducibility by seed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from selfflow.cli import main
from selfflow.eval.media import to_uint8
from selfflow.flow.samplers import SamplerConfig
from selfflow.pipeline import SelfFlowPipeline

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own")
    src = root / "my_pictures"
    src.mkdir()
    for i in range(12):
        name = list(COLOURS)[i % 3]
        Image.new("RGB", (40 + i, 30 + i), COLOURS[name]).save(src / f"photo_{i:02d}.png")
        (src / f"photo_{i:02d}.txt").write_text(f"a {name} picture")
    raw, latents, run = root / "raw", root / "latents", root / "runs" / "mine"
    assert main(["pack", f"src={src}", f"out_dir={raw}", "image_size=16", "workers=1"]) == 0
    prepare = ["prepare", f"raw_dir={raw}", f"out_dir={latents}", "modalities.video=null", "modalities.audio=null"]
    assert main([*prepare, "modalities.image.patch=[4,4]", "workers=1", "sentencepiece_type=word"]) == 0
    train = ["train", "--config", str(REPO / "configs/train/small_own_data.yaml"), f"run_dir={run}"]
    train += ["modalities.video=null", "modalities.audio=null", "modalities.image.probability=1"]
    train += [f"modalities.image.shards={latents / 'image'}", "modalities.image.batch_size=4"]
    assert main([*train, "steps=3", "save_every=3", "tracking.enabled=false", "lr.warmup_steps=1"]) == 0
    out = run / "export" / "ema.safetensors"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    return {"root": root, "latents": latents, "run": run, "folder": out.with_suffix("")}


def test_the_model_folder_holds_weights_text_model_and_card(model_folder):
    folder, run = model_folder["folder"], model_folder["run"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "modalities.json", "model.safetensors", "text", "training.yaml",
    ]  # fmt: skip
    ema = load_file(str(run / "checkpoints" / "step_00000003" / "ema.safetensors"))
    exported = load_file(str(folder / "model.safetensors"))
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "selfflow-model-1" and config["step"] == 3
    assert config["model"]["modalities"]["image"] == [48, 48]  # 3 channels x 4 x 4 patch, from the manifest
    latents = model_folder["latents"]
    assert (folder / "text" / "spm.model").read_bytes() == (latents / "text" / "spm.model").read_bytes()
    modalities = json.loads((folder / "modalities.json").read_text())
    assert modalities["image"]["latent_shape"] == [3, 16, 16] and modalities["image"]["tokens"] == 16
    card = (folder / "README.md").read_text()
    assert "| image | 12 | raw" in card and "## Training config" in card and "selfflow generate" in card


def test_generate_writes_the_prompted_image_with_its_settings_and_is_reproducible(model_folder, tmp_path):
    folder = model_folder["folder"]
    common = ["generate", "--model", str(folder), "prompt=a red picture", "modality=image", "num_samples=2"]
    common += ["sampler.num_steps=4", "sampler.cfg_scale=2.0"]
    assert main([*common, f"out_dir={tmp_path / 'a'}"]) == 0
    assert main([*common, f"out_dir={tmp_path / 'b'}"]) == 0
    assert main([*common, "seed=1", f"out_dir={tmp_path / 'c'}"]) == 0
    first = tmp_path / "a" / "image-0-0000.png"
    with Image.open(first) as img:
        assert img.size == (16, 16)
        meta = json.loads(img.text["selfflow"])
        pixels = np.asarray(img)
    assert meta["prompt"] == "a red picture" and meta["seed"] == 0
    assert meta["sampler"]["num_steps"] == 4 and meta["sampler"]["cfg_scale"] == 2.0 and meta["step"] == 3
    assert json.loads((tmp_path / "a" / "image-0-0000.json").read_text()) == meta
    assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "b" / "image-0-0000.png")))
    assert not np.array_equal(pixels, np.asarray(Image.open(tmp_path / "c" / "image-1-0000.png")))

    pipe = SelfFlowPipeline.from_pretrained(folder)
    media = pipe("a red picture", "image", 2, SamplerConfig(kind="euler", num_steps=4, cfg_scale=2.0), seed=0)
    assert media.shape == (2, 3, 16, 16)
    assert np.array_equal(to_uint8(media)[0], pixels)  # the library call and the command agree


def test_bad_requests_are_named(model_folder, tmp_path, capsys):
    pipe = SelfFlowPipeline.from_pretrained(model_folder["folder"])
    with pytest.raises(ValueError, match="this model reads at most"):
        pipe("a " + "red " * 70 + "picture", "image")  # 72 words, the model reads 64 tokens
    with pytest.raises(ValueError, match=r"modality 'audio': this model decodes \['image'\]"):
        pipe("a red picture", "audio")
    with pytest.raises(FileNotFoundError, match="is .* a folder written by `selfflow export`"):
        SelfFlowPipeline.from_pretrained(tmp_path)
    assert main(["generate", "model=", "prompt=x"]) == 2
    missing = tmp_path / "ema.safetensors"
    assert main(["eval", f"checkpoint={missing}", f"eval.data={model_folder['latents']}"]) == 2
    assert f"write one with `selfflow export --run RUN_DIR --out {missing}`" in capsys.readouterr().err


def test_eval_and_report_on_your_own_data_skip_the_built_in_metrics(model_folder):
    run, latents = model_folder["run"], model_folder["latents"]
    out = run / "evals" / "final"
    evaluate = ["eval", f"checkpoint={run}", f"eval.data={latents}", "eval.modalities=[image]", f"out_dir={out}"]
    assert main([*evaluate, "eval.num_samples=4", "eval.sampler.num_steps=2", "device=cpu"]) == 0
    result = json.loads((out / "eval.json").read_text())
    # no ground truth to check captions against, no built-in feature net of your data
    assert "fd_builtin" not in result["metrics"]["image"] and "caption_accuracy" not in result["metrics"]["image"]
    assert not (model_folder["root"] / "data").exists()
    assert result["media"]["image"]["real"]["files"] == ["samples/real_image_grid.png"]  # beside the samples
    assert (out / "samples" / "real_image_grid.png").is_file() and (out / "samples" / "image_grid.png").is_file()
    report = run / "report"
    assert main(["report", f"runs=[{run}]", f"out_dir={report}", "mlflow=false"]) == 0
    assert (report / "report.html").is_file()


def test_the_model_card_tabulates_the_latest_evaluation():
    from selfflow.training.export import model_card

    config = {"model": {"kind": "mmdit", "hidden_size": 8}, "step": 7, "selfflow_version": "x", "text": None}
    evaluation = {
        "step": 7,
        "protocol": {"sampler": {"kind": "euler", "num_steps": 25, "cfg_scale": 1.0}},
        "metrics": {"image": {"fd_builtin": 12.5, "caption_accuracy": {"overall": 0.25}, "seconds": 3.0}},
    }
    card = model_card(config, {}, {}, {"steps": 7}, evaluation)
    assert "## Evaluation (step 7, euler 25 steps, CFG 1.0)" in card
    assert "| image | fd_builtin | 12.5 |" in card and "| image | caption_accuracy | 0.25 |" in card
    assert "seconds" not in card
