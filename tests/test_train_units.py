"""Pure parts of training: the DeepSpeed config dict, schedules, modality draws, checkpoint folders."""

import math
import warnings

import pytest
import torch

from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.config import ConfigError, load_config
from selfflow.training import checkpoints
from selfflow.training.engine import DeepSpeedConfig, ds_config_dict, param_groups
from selfflow.training.train import EMAConfig, TrainConfig, draw_modality, ema_decay


def test_ds_config_dict_carries_every_setting():
    cfg = DeepSpeedConfig(
        zero_stage=3,
        bf16=True,
        grad_clip=0.5,
        grad_accum=4,
        lr=3e-4,
        betas=[0.9, 0.95],
        weight_decay=0.1,
        warmup_steps=500,
    )
    d = ds_config_dict(cfg, micro_batch=38)
    assert d["zero_optimization"]["stage"] == 3
    assert d["bf16"] == {"enabled": True} and d["data_types"] == {"grad_accum_dtype": "fp32"}
    assert d["gradient_clipping"] == 0.5 and d["gradient_accumulation_steps"] == 4
    assert d["train_micro_batch_size_per_gpu"] == 38
    assert d["optimizer"]["type"] == "AdamW"
    assert d["optimizer"]["params"] == {
        "lr": 3e-4,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.1,
        "torch_adam": True,
    }
    assert d["scheduler"]["params"]["warmup_num_steps"] == 500 and d["scheduler"]["params"]["warmup_max_lr"] == 3e-4
    assert "data_types" not in ds_config_dict(DeepSpeedConfig(bf16=False), micro_batch=2)


def test_param_groups_cover_every_parameter_once():
    model = build_mmdit(MMDiTConfig.tiny())
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_ema_decay_is_a_pure_function_of_the_step():
    assert ema_decay(EMAConfig(0.9999), 0) == 0.9999
    warm = EMAConfig(0.9999, warmup=True)
    assert ema_decay(warm, 0) == pytest.approx(0.1) and ema_decay(warm, 90) == pytest.approx(0.91)
    assert ema_decay(warm, 10**7) == 0.9999


def test_modality_draw_frequencies_and_agreement():
    cfg = TrainConfig()  # image 0.57, video 0.30, audio 0.13
    draws = [draw_modality(cfg, step) for step in range(20000)]
    for name, p in (("image", 0.57), ("video", 0.30), ("audio", 0.13)):
        freq = draws.count(name) / len(draws)
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / len(draws)), (name, freq)  # 5 sigma
    assert draws[:50] == [draw_modality(cfg, step) for step in range(50)]  # no hidden state: every rank agrees
    other_seed = load_config(TrainConfig, None, ["seed=1"])
    assert draws[:50] != [draw_modality(other_seed, step) for step in range(50)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("modalities.image.probability=0.9", "sum to 1"),
        ("model.projector_dim=0", "projector_dim"),
        ("objective.teacher_layer=99", "layers"),
        ("nan_policy=ignore", "nan_policy"),
        ("deepspeed.zero_stage=4", "zero_stage"),
        ("modalities.image.data.channels=7", "model.modalities.image"),
        ("objective.method=repa", "repa_encoder"),
    ],
)
def test_train_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, "configs/train/tiny.yaml", [override])


def test_modality_entries_start_from_their_defaults():
    cfg = load_config(TrainConfig, None, ["modalities.image.batch_size=4"])
    assert cfg.modalities["image"].batch_size == 4 and cfg.modalities["image"].mask_ratio == 0.25
    assert sorted(cfg.modalities) == ["audio", "image", "video"]
    cfg = load_config(
        TrainConfig, None, ["modalities.video=null", "modalities.audio=null", "modalities.image.probability=1"]
    )
    assert list(cfg.modalities) == ["image"]
    cfg = load_config(TrainConfig, "configs/train/tiny.yaml")
    assert cfg.modalities["audio"].mask_ratio == 0.5 and cfg.modalities["video"].mask_ratio == 0.1
    assert cfg.modalities["audio"].timesteps.shift == 0.75


def _fake_checkpoint(run_dir, step, complete=True):
    folder = checkpoints.checkpoint_dir(run_dir, step)
    folder.mkdir(parents=True)
    (folder / "ema.safetensors").write_bytes(b"x")
    checkpoints.write_state(folder, {"step": step})
    if complete:
        checkpoints.mark_complete(folder)
    return folder


def test_latest_moves_only_when_complete_and_incomplete_is_refused(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20, complete=False)  # a save that was killed
    assert (checkpoints.checkpoint_root(tmp_path) / "latest").read_text().strip() == "step_00000010"
    with pytest.warns(UserWarning, match=r"step_00000020.*COMPLETE"):
        assert checkpoints.candidates(tmp_path) == [checkpoints.checkpoint_dir(tmp_path, 10)]


def test_latest_pointing_at_a_broken_folder_falls_back(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    broken = _fake_checkpoint(tmp_path, 20)
    (broken / "ema.safetensors").unlink()
    with pytest.warns(UserWarning, match="ema.safetensors missing"):
        assert checkpoints.candidates(tmp_path) == [checkpoints.checkpoint_dir(tmp_path, 10)]


def test_prune_keeps_the_newest_complete(tmp_path):
    for step in (10, 20, 30, 40):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 5, complete=False)
    checkpoints.prune(tmp_path, keep=2)
    left = sorted(p.name for p in checkpoints.checkpoint_root(tmp_path).glob("step_*"))
    assert left == ["step_00000030", "step_00000040"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoints.candidates(tmp_path)[0].name == "step_00000040"


def test_other_modalities_zero_touches_every_other_projection():
    cfg = MMDiTConfig.tiny()
    cfg.modalities = {"image": [16, 16], "video": [16, 16], "audio": [8, 8]}
    model = build_mmdit(cfg)
    zero = model.other_modalities_zero("image")
    assert zero.item() == 0.0
    zero.backward()
    for name in ("vid_in", "aud_in"):
        assert getattr(model, name).weight.grad is not None
    assert model.final_layer.aud_linear.weight.grad is not None and model.img_in.weight.grad is None
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)


def test_compile_is_refused_with_zero3():
    with pytest.raises(ConfigError, match="compile"):
        load_config(TrainConfig, "configs/train/tiny.yaml", ["compile=true", "deepspeed.zero_stage=3"])
