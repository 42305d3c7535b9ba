"""REPA on latent spaces and the autoencoder-dependent defaults of pretraining (CPU, tiny random autoencoders).

REPA's targets come from decoding the clean tokens with the data's autoencoder (checked against the
adapter's own decode), video frame by frame; a modality REPA cannot serve is a config error; "auto"
timesteps follow the autoencoder; and `selfflow train` runs the SiT with REPA on SD-VAE latent shards
that `selfflow prepare` wrote.

    DS_ACCELERATOR=cpu .venv/bin/pytest -q tests/test_repa_latents.py
"""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL
from tiny_autoencoders import TINY_2D
from train_runs import REPO, launch, metrics

from selfflow.cli import main
from selfflow.config import ConfigError, load_config
from selfflow.modalities.builder import TIMESTEP_DISTRIBUTION, ModalityConfig, build_modality
from selfflow.training.latent_space import repa_targets, token_frame_of_pixel_frame
from selfflow.training.train import PretrainTask, TrainConfig

TINY = REPO / "configs" / "train" / "tiny.yaml"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd_vae")
    AutoencoderKL(**TINY_2D).save_pretrained(folder)
    return folder


def pooled_encoder(seen: list):
    """A stand-in encoder: the images' mean over each cell of the token grid, (N, h*w, 3); records its input."""

    def encode(images, grid, device):
        seen.append(images)
        return F.adaptive_avg_pool2d(images, grid).flatten(2).transpose(1, 2).to(device)

    return encode


@torch.no_grad()
def test_image_targets_come_from_the_autoencoders_decode(sd_vae_dir):
    adapter = build_modality(ModalityConfig("image", "sd_vae", path=str(sd_vae_dir)))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latent = adapter.encode(images)  # (2, 4, 8, 8) -> 4x4 tokens of 16 channels
    tokens, ids = adapter.tokenize(latent)
    order = torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(2))
    tokens, ids = tokens[:, order], ids[:, order]  # targets follow each token's id, not its index
    seen = []
    target = repa_targets(adapter, tokens, ids, pooled_encoder(seen), CPU)
    decoded = adapter.decode(latent)
    torch.testing.assert_close(seen[0], decoded, rtol=0, atol=1e-5)  # the encoder saw the decoded clean latent
    cells = F.adaptive_avg_pool2d(decoded, (4, 4))  # (2, 3, 4, 4)
    expected = torch.stack([cells[b, :, ids[b, :, 1], ids[b, :, 2]].T for b in range(2)])
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_video_targets_average_the_frames_of_each_token_frame():
    adapter = build_modality(ModalityConfig("video", "raw", patch=[2, 2, 2]))
    video = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    tokens, ids = adapter.tokenize(video)  # 2 x 4 x 4 tokens
    seen = []
    target = repa_targets(adapter, tokens, ids, pooled_encoder(seen), CPU)
    assert seen[0].shape == (8, 3, 8, 8)  # every frame through the image encoder
    cells = F.adaptive_avg_pool2d(video.transpose(1, 2).flatten(0, 1), (4, 4)).unflatten(0, (2, 4))  # (B, T, 3, 4, 4)
    per_token_frame = (cells[:, 0::2] + cells[:, 1::2]) / 2  # frames (0, 1) and (2, 3)
    f, h, w = ids[0, :, 0], ids[0, :, 1], ids[0, :, 2]
    expected = per_token_frame.permute(0, 1, 3, 4, 2)[:, f, h, w]  # (B, L, 3)
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-6)


def test_wan_frames_map_to_their_latent_frames():
    """Wan2.2: latent frame 0 is frame 0 alone, then 4 frames each (45 frames -> 12 latent frames)."""
    wan = SimpleNamespace(autoencoder=SimpleNamespace(causal=True, temporal=4), grid_patch=(1, 1, 1))
    assert token_frame_of_pixel_frame(wan, 9).tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert int(token_frame_of_pixel_frame(wan, 45).max()) == 11
    wan2 = SimpleNamespace(autoencoder=wan.autoencoder, grid_patch=(2, 1, 1))  # temporal token patch 2
    assert token_frame_of_pixel_frame(wan2, 9).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]


PIXELS = [  # tiny.yaml with raw-pixel image and video tokens (3 x 2 x 2 channels)
    "model.modalities.image=[12, 12]",
    "modalities.image.data.channels=12",
    "model.modalities.video=[12, 12]",
    "modalities.video.data.channels=12",
    "model.projector_dim=32",
    "objective.method=repa",
    "objective.repa_encoder=/nowhere",
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "modality audio has no REPA encoder.*objective.repa_skip=\\[audio\\]"),
        (["objective.repa_skip=[audio, text]"], "repa_skip names modalities this run does not train: \\['text'\\]"),
        (
            ["objective.repa_skip=[audio]", "model.modalities.video=[16, 16]", "modalities.video.data.channels=16"],
            "REPA needs pixels: synthetic video tokens of 16 channels",
        ),
        (
            [
                "objective.repa_skip=[audio, video]",
                "model.modalities.image=[16, 16]",
                "modalities.image.data.channels=16",
            ],
            "REPA needs pixels: synthetic image",
        ),
    ],
)
def test_a_modality_repa_cannot_serve_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, TINY, [*PIXELS, *overrides])
    cfg = load_config(TrainConfig, TINY, [*PIXELS, "objective.repa_skip=[audio]"])
    assert cfg.model.projector_kind == "repa" and cfg.objective.rep_weight == 0.5  # REPA's head and coefficient


def prepared(root, autoencoder: str, path: str | None = None):
    """A latent folder with a shard and the manifest `selfflow prepare` writes (only what training reads)."""
    (root / "image").mkdir(parents=True)
    (root / "image" / "shard-000000.tar").write_bytes(b"")
    entry = {"name": "image", "autoencoder": autoencoder, "path": path, "patch": [2, 2]}
    (root / "manifest.json").write_text(json.dumps({"modalities": {"image": {"modality": entry}}}))
    return str(root / "image")


def image_only(shards: str, *extra: str) -> list[str]:
    only = ["modalities.video=null", "modalities.audio=null", "modalities.image.probability=1"]
    return [*only, f"modalities.image.shards={shards}", *extra]


def test_auto_timesteps_follow_the_autoencoder(tmp_path, sd_vae_dir):
    """Paper 4.3: uniform for SD-VAE latents, logit-normal for FLUX.2 AE (and raw / synthetic) latents."""
    sd = prepared(tmp_path / "sd", "sd_vae", "/models/sd-vae")  # read from the manifest, never loaded
    flux = prepared(tmp_path / "flux", "flux2", "/models/flux2-ae")
    cases = [(image_only(sd), "uniform"), (image_only(flux), "logit_normal"), ([], "logit_normal")]
    cases.append((image_only(sd, "modalities.image.timesteps.distribution=logit_normal"), "logit_normal"))
    for overrides, expected in cases:
        cfg = load_config(TrainConfig, TINY, overrides)
        PretrainTask(cfg)  # resolves "auto" in cfg, which the run then saves
        assert cfg.modalities["image"].timesteps.distribution == expected, overrides
    assert (
        build_modality(ModalityConfig("image", "sd_vae", path=str(sd_vae_dir))).defaults.timesteps.distribution
        == (TIMESTEP_DISTRIBUTION["sd_vae"])
    )
    (tmp_path / "sd" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json beside .*set modalities.image.timesteps"):
        PretrainTask(load_config(TrainConfig, TINY, image_only(sd)))


def test_sit_trains_with_repa_on_sd_vae_latent_shards(tmp_path, sd_vae_dir):
    """synth -> prepare (tiny SD-VAE) -> `selfflow train` SiT + REPA: the encoder sees decoded pixels."""
    from transformers import Dinov2Config, Dinov2Model

    raw, lat = tmp_path / "raw", tmp_path / "lat"
    small = ["num_images=16", "num_videos=2", "num_audio=2", "samples_per_shard=8"]
    assert main(["synth", "--config", str(REPO / "configs/data/synth.yaml"), f"out_dir={raw}", *small]) == 0
    image = f"modalities.image={{name: image, autoencoder: sd_vae, path: '{sd_vae_dir}', patch: [2, 2]}}"
    prep = ["prepare", "--config", str(REPO / "configs/data/prepare_tiny.yaml"), f"raw_dir={raw}", f"out_dir={lat}"]
    assert main([*prep, image, "modalities.video=null", "modalities.audio=null"]) == 0
    torch.manual_seed(0)
    dino = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=14)
    Dinov2Model(Dinov2Config(**dino)).save_pretrained(tmp_path / "dinov2")
    run_dir = tmp_path / "run"
    launch(
        1,
        run_dir,
        "steps=2",
        "save_every=2",
        "model.input_size=16",  # 32 px images -> 16x16x4 tiny SD-VAE latents -> 8x8 tokens of 16 channels
        f"modalities.image.shards={lat / 'image'}",
        "modalities.image.timesteps.distribution=auto",
        "objective.method=repa",
        f"objective.repa_encoder={tmp_path / 'dinov2'}",
        "model.projector_dim=32",
        config=REPO / "configs" / "train" / "sit_tiny.yaml",
    )
    rows = metrics(run_dir)
    assert len(rows) == 2 and all(r["rep"] != 0 and r["rep"] == r["rep"] for r in rows)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["modalities"]["image"]["timesteps"]["distribution"] == "uniform"  # resolved from sd_vae
    assert saved["model"]["projector_kind"] == "repa" and saved["objective"]["repa_coeff"] == 0.5


def test_repa_encoder_width_must_match_the_projector(tmp_path):
    from selfflow.pretrain import PretrainConfig, repa_target

    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 32}))
    overrides = [*PIXELS, f"objective.repa_encoder={tmp_path / 'enc'}", "objective.repa_skip=[audio]"]
    assert callable(repa_target(load_config(PretrainConfig, TINY, overrides)))  # nothing loaded yet
    with pytest.raises(ValueError, match="model.projector_dim must be 32"):
        repa_target(load_config(PretrainConfig, TINY, [*overrides, "model.projector_dim=16"]))
