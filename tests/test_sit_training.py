"""`selfflow train` on the SiT trunk: presets, `model.kind`, `init=` from the public release's weights
(the reference fixture), two training steps, and the export sampling like the public model.

    DS_ACCELERATOR=cpu .venv/bin/pytest -q tests/test_sit_training.py
"""

import dataclasses

import pytest
import torch
from conftest import FIXTURES, assert_release
from train_runs import REPO, launch, metrics

from selfflow.backbone.mmdit import MMDiTConfig
from selfflow.backbone.sit import SiT, SiTConfig
from selfflow.cli import _keys_epilog
from selfflow.config import ConfigError, load_config
from selfflow.flow.samplers import SamplerConfig, sample
from selfflow.modalities.grid import patchify, unpatchify
from selfflow.pretrain import PretrainConfig
from selfflow.training.export import export, load_export
from selfflow.training.train import PretrainTask, TrainConfig

SIT_TINY = REPO / "configs" / "train" / "sit_tiny.yaml"
SIT_XL = REPO / "configs" / "train" / "sit_xl2_imagenet256.yaml"
FIXTURE = FIXTURES / "selfflow_reference.pt"


def test_sit_xl2_preset_is_the_papers_recipe():
    cfg = load_config(PretrainConfig, SIT_XL)
    assert isinstance(cfg.model, SiTConfig) and cfg.model == dataclasses.replace(
        SiTConfig.xl_2(), projector_kind="selfflow"
    )
    assert (cfg.objective.method, cfg.objective.student_layer, cfg.objective.teacher_layer) == ("selfflow", 8, 20)
    assert cfg.objective.gamma == 0.8 and cfg.model.projector_out == 1152
    assert list(cfg.modalities) == ["image"]
    image = cfg.modalities["image"]
    assert image.timesteps.distribution == "uniform" and image.mask_ratio == 0.25 and image.batch_size * 8 == 256
    assert (cfg.lr.peak, cfg.lr.decay, cfg.lr.warmup_steps, cfg.ema.decay) == (1e-4, "constant", 0, 0.9999)
    assert cfg.deepspeed.weight_decay == 0.0 and cfg.deepspeed.bf16 and cfg.deepspeed.grad_clip == 1.0


def test_model_kind_selects_the_trunk_and_its_keys():
    assert isinstance(load_config(TrainConfig, REPO / "configs/train/tiny.yaml").model, MMDiTConfig)
    cfg = load_config(TrainConfig, SIT_TINY, ["model.depth=4", "objective.teacher_layer=3"])
    assert isinstance(cfg.model, SiTConfig) and cfg.model.depth == 4 and cfg.model.hidden_size == 64
    with pytest.raises(ConfigError, match="unknown key model.depth_double"):
        load_config(TrainConfig, SIT_TINY, ["model.depth_double=2"])
    with pytest.raises(ConfigError, match="model.kind must be one of"):
        load_config(TrainConfig, SIT_TINY, ["model.kind=dit"])
    # kind=sit starts from SiT's own defaults (SiT-XL/2), not from the MMDiT's values
    sit = load_config(
        TrainConfig,
        None,
        ["model.kind=sit", "modalities.video=null", "modalities.audio=null"]
        + [
            "modalities.image.probability=1",
            "modalities.image.data.grid=[1, 16, 16]",
            "modalities.image.data.channels=16",
        ],
    )
    assert sit.model == dataclasses.replace(SiTConfig.xl_2(), projector_kind="selfflow")
    assert (sit.objective.student_layer, sit.objective.teacher_layer) == (8, 20)  # null -> 8/28, 20/28 of 28
    mmdit = load_config(TrainConfig, None)
    assert (mmdit.objective.student_layer, mmdit.objective.teacher_layer) == (6, 15)  # of 21 blocks
    epilog = _keys_epilog(PretrainConfig, "train")
    assert "model.kind" in epilog and "model.compatibility_mode" in epilog and "model.axes_dim" in epilog


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("modalities.video={}", "image latents only"),
        ("modalities.image.data.channels=12", r"grid \[1, 4, 4\] x 16 channels"),
        ("modalities.image.data.num_classes=11", "null class"),
        ("eval_every=10", "selfflow sample"),
        ("model.projector_dim=32", "projector_dim must equal model.hidden_size 64"),
    ],
)
def test_sit_config_errors(override, message):
    overrides = ["modalities.image.probability=0.5", "modalities.video.probability=0.5"]
    extra = overrides if override.startswith("modalities.video") else []
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, SIT_TINY, [override, *extra])


# REPA's head on the SiT; the synthetic latents are not pixels, so this run trains image with flow matching
REPA = [
    "objective.method=repa",
    "objective.repa_encoder=/nowhere",
    "model.projector_dim=32",
    "objective.repa_skip=[image]",
]


def test_projector_head_follows_the_objective():
    repa = REPA
    assert load_config(TrainConfig, SIT_TINY, repa).model.projector_kind == "repa"
    assert load_config(TrainConfig, SIT_TINY).model.projector_kind == "selfflow"
    explicit = load_config(TrainConfig, SIT_TINY, [*repa, "model.projector_kind=selfflow"])
    assert explicit.model.projector_kind == "selfflow"  # an explicit head is kept


@torch.no_grad()
def test_init_loads_the_public_weights_and_keeps_the_release_convention(reference):
    """init= reads the file with the weights-only unpickler; the loaded trunk equals the fixture's tensors and
    its velocity in this project's convention (t = 1 noise, v = noise - x0) is the fixture's recorded output."""
    cfg = load_config(TrainConfig, SIT_TINY, [f"init={FIXTURE}"])
    model = PretrainTask(cfg).build_model()
    state = model.state_dict()
    assert set(state) == set(reference["state_dict"])
    assert all(torch.equal(state[k], v) for k, v in reference["state_dict"].items())
    r = reference  # velocities reach 12: 1e-6 relative covers the thread count's summation order
    assert_release(model(r["x"], r["t_scalar"], r["y"], r["x_ids"]), r["v_scalar_t"])
    assert_release(model(r["x"], r["t_token"], r["y"], r["x_ids"]), r["v_token_t"])
    flipped = dataclasses.replace(cfg.model, compatibility_mode=False)  # the wrong axis gives other velocities
    other = SiT(flipped)
    other.load_state_dict(reference["state_dict"])
    assert (other(r["x"], r["t_scalar"], r["y"], r["x_ids"]) - r["v_scalar_t"]).abs().max() > 1e-2


def test_init_refuses_another_trunk_and_renews_only_the_projector(tmp_path, reference):
    with pytest.raises(ValueError, match=r"does not fit model \(sit\).*unexpected \['blocks.4"):
        PretrainTask(load_config(TrainConfig, SIT_TINY, [f"init={FIXTURE}", "model.depth=4"])).build_model()
    with pytest.raises(ValueError, match="shape mismatch for pos_embed"):
        PretrainTask(
            load_config(
                TrainConfig,
                SIT_TINY,
                [f"init={FIXTURE}", "model.input_size=16"] + ["modalities.image.data.grid=[1, 8, 8]"],
            )
        ).build_model()
    with pytest.raises(FileNotFoundError):
        PretrainTask(load_config(TrainConfig, SIT_TINY, [f"init={tmp_path / 'none.pt'}"]))
    # REPA's head on the public trunk: the trunk loads, the projector starts fresh
    cfg = load_config(TrainConfig, SIT_TINY, [f"init={FIXTURE}", *REPA])
    model = PretrainTask(cfg, repa=lambda *a: None).build_model()
    assert torch.equal(model.blocks[5].mlp.fc2.weight, reference["state_dict"]["blocks.5.mlp.fc2.weight"])
    assert model.projector[4].weight.shape == (32, 2048)


def test_compile_blocks_wraps_every_block(reference):
    model = SiT(SiTConfig(**reference["config"]))
    model.compile_blocks()
    assert all(block._compiled_call_impl is not None for block in model.blocks)


def test_two_steps_from_the_public_weights_then_the_export_samples_like_the_release(tmp_path, reference):
    run_dir = tmp_path / "sit"
    launch(1, run_dir, "steps=2", "save_every=2", f"init={FIXTURE}", "ema.decay=0.9999", config=SIT_TINY)
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] and r["rep"] != 0 for r in rows)

    out = export(run_dir, tmp_path / "sit.safetensors", student=True)
    model, meta = load_export(out)
    student, _ = load_export(tmp_path / "sit.student.safetensors")
    assert isinstance(model, SiT) and model.cfg.compatibility_mode and meta["step"] == "2"
    fixture = reference["state_dict"]
    ema_gap = max((p - fixture[n]).abs().max().item() for n, p in model.named_parameters())
    trained = max((p - fixture[n]).abs().max().item() for n, p in student.named_parameters())
    assert trained > 1e-5 and ema_gap < 1e-3 * trained  # two steps moved the student; the EMA barely

    r = reference["sde_8steps"]  # the public sampler's run on the fixture's weights
    noise, ids = patchify(r["noise"], model.cfg.patch_size)
    torch.manual_seed(r["sampler_seed"])
    with torch.no_grad():
        tokens = sample(lambda x, t, y: model(x, t, y), noise, r["labels"], SamplerConfig(kind="sde", num_steps=8))
    latents = unpatchify(tokens, ids, model.cfg.patch_size, model.cfg.in_channels, model.cfg.grid, model.cfg.grid)
    assert torch.isfinite(latents).all()
    # The EMA is within ~1e-7 of the fixture's weights; the random tiny model amplifies that to ~1e-3 over the
    # 8 SDE steps (latents reach 12), where the fixture weights themselves reproduce to 1e-4 (test_samplers).
    torch.testing.assert_close(latents, r["latents"], rtol=0, atol=5e-3)
