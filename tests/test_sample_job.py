"""`selfflow sample` end to end: tiny random SiT + a tiny random diffusers AutoencoderKL on disk."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from train_runs import torchrun

from selfflow.backbone.sit import SiT, SiTConfig
from selfflow.cli import main

MODEL = SiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
OVERRIDES = [
    "model.input_size=4",
    "model.patch_size=2",
    "model.in_channels=4",
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.num_classes=5",
    "sampler.num_steps=6",
    "num_samples=5",
    "device=cpu",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny 8x-downsampling AutoencoderKL folder and a training-style checkpoint."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(root / "vae")
    model = SiT(MODEL)
    model.init_weights()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.save({"ema": model.state_dict(), "model": {}, "step": 10}, root / "ckpt.pt")
    return {"vae": root / "vae", "ckpt": root / "ckpt.pt"}


def run(out: Path, assets, *extra: str) -> np.ndarray:
    args = [*OVERRIDES, f"vae={assets['vae']}", f"checkpoint={assets['ckpt']}", f"out_dir={out}", *extra]
    assert main(["sample", *args]) == 0
    return np.load(out / "samples_5.npz")["arr_0"]


def test_writes_pngs_npz_and_config(tmp_path, assets):
    arr = run(tmp_path / "a", assets, "batch_size=2")
    assert arr.dtype == np.uint8 and arr.shape == (5, 32, 32, 3)
    pngs = sorted((tmp_path / "a" / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(pngs[3])), arr[3])
    assert (tmp_path / "a" / "config.yaml").read_text().count("num_steps: 6") == 1
    assert arr.std() > 0  # decoded images are not constant


def test_samples_do_not_depend_on_batch_size_or_processes(tmp_path, assets):
    """Each sample's noise is fixed by its index; only float rounding of batched kernels may differ."""
    one = run(tmp_path / "one", assets, "batch_size=5")
    small = run(tmp_path / "small", assets, "batch_size=2")
    assert_same_images(one, small)
    args = [*OVERRIDES, f"vae={assets['vae']}", f"checkpoint={assets['ckpt']}", f"out_dir={tmp_path / 'two'}"]
    proc = torchrun(2, "-m", "selfflow.cli", "sample", *args, "batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = np.load(tmp_path / "two" / "samples_5.npz")["arr_0"]
    assert_same_images(one, two)


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_seed_and_cfg_change_samples(tmp_path, assets):
    base = run(tmp_path / "base", assets)
    for name, override in (("seed", "seed=1"), ("cfg", "sampler.cfg_scale=4.0")):
        other = run(tmp_path / name, assets, override)
        assert np.abs(base.astype(int) - other.astype(int)).mean() > 0.1, name  # 10x the rounding bound above


def test_clear_errors_for_missing_or_wrong_files(tmp_path, assets, capsys):
    assert main(["sample", *OVERRIDES, f"vae={tmp_path / 'novae'}", f"out_dir={tmp_path}"]) == 2
    assert "novae has no config.json" in capsys.readouterr().err
    assert main(["sample", *OVERRIDES, f"vae={assets['vae']}", f"checkpoint={tmp_path / 'x.pt'}"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    wrong = [*OVERRIDES, "model.hidden_size=64", f"vae={assets['vae']}", f"checkpoint={assets['ckpt']}"]
    assert main(["sample", *wrong, f"out_dir={tmp_path / 'w'}"]) == 2
    assert "shape mismatch" in capsys.readouterr().err


def test_help_lists_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    for key in ("sampler.cfg_interval", "model.depth", "checkpoint", "vae", "num_samples"):
        assert key in text
