"""Parts of training without a training run: the DeepSpeed config dict, schedules, modality draws,
checkpoint folders and manifests, metrics.jsonl, the ZeRO-3 zero term, the engine's learning rate."""

import json
import math

import pytest
import torch

from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.config import ConfigError, load_config
from selfflow.training import checkpoints
from selfflow.training.engine import DeepSpeedConfig, Engine, _UnusedModules, ds_config_dict, param_groups
from selfflow.training.schedules import EMAConfig, LRConfig, ema_decay, lr_at
from selfflow.training.steplog import truncate_jsonl
from selfflow.training.train import TrainConfig, draw_modality


def test_ds_config_dict_carries_every_setting():
    cfg = DeepSpeedConfig(
        zero_stage=3,
        bf16=True,
        grad_clip=0.5,
        grad_accum=4,
        betas=[0.9, 0.95],
        weight_decay=0.1,
    )
    d = ds_config_dict(cfg, micro_batch=38, lr=3e-4)
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
    assert "scheduler" not in d  # the run loop sets every step's learning rate itself
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


def test_lr_schedule_is_a_pure_function_of_the_step():
    warm = LRConfig(peak=1e-3, warmup_steps=4)
    assert [lr_at(warm, i, 100) for i in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    cosine = LRConfig(peak=1e-3, warmup_steps=10, decay="cosine", floor=1e-5)
    values = [lr_at(cosine, i, 110) for i in range(110)]
    assert values[9] == pytest.approx(1e-3) and values[10] == pytest.approx(1e-3)
    assert values[60] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert values[-1] == pytest.approx(1e-5)  # the last step reaches the floor
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))  # decays monotonically
    linear = LRConfig(peak=1.0, decay="linear", floor=0.0, decay_steps=5)
    assert [lr_at(linear, i, 100) for i in range(7)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0])
    assert values == [lr_at(cosine, i, 110) for i in range(110)]  # no hidden state
    with pytest.raises(ValueError, match="decay"):
        LRConfig(decay="step")
    with pytest.raises(ValueError, match="floor"):
        LRConfig(peak=1e-4, floor=1e-3)


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
        ("deepspeed.bf16=true deepspeed.zero_stage=0", "bf16 needs zero_stage 1-3"),
        ("modalities.image.data.channels=7", "model.modalities.image"),
        ("objective.method=repa", "repa_encoder"),
        ("model.projector_dim=32", "projector_dim must equal model.hidden_size 64"),
        ("max_skips_in_a_row=0", "max_skips_in_a_row"),
        ("lr.decay=exponential", "decay"),
        ("modalities.image.max_bad_samples=0", "max_bad_samples"),
        ("objective.contrastive_weight=0.05 modalities.video.batch_size=1", "at least 2.*\\['video'\\] have 1"),
    ],
)
def test_train_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, "configs/train/tiny.yaml", override.split())


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


def test_token_widths_and_text_setup_come_from_the_prepared_manifest(tmp_path):
    data = tmp_path / "latents"
    (data / "image").mkdir(parents=True)
    manifest = {
        "modalities": {"image": {"token_dim": 12, "modality": {"name": "image", "autoencoder": "raw"}}},
        "text": {"vocab_size": 40, "dim": None, "config": {"kind": "sentencepiece", "max_length": 9}},
    }
    (data / "manifest.json").write_text(json.dumps(manifest))
    only_image = ["modalities.video=null", "modalities.audio=null", "modalities.image.probability=1"]
    # the preset says [48, 48] and no text vocabulary: the data's manifest decides
    overrides = [*only_image, f"modalities.image.shards={data / 'image'}", "model.modalities.image=[48,48]"]
    overrides += ["model.context_dim=16"]
    cfg = load_config(TrainConfig, "configs/train/tiny.yaml", overrides)
    assert cfg.model.modalities["image"] == [12, 12]
    assert (cfg.model.text_vocab, cfg.model.text_max_length) == (40, 9)
    manifest["text"] = {"vocab_size": None, "dim": 24, "config": {"kind": "t5", "max_length": 9}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(TrainConfig, "configs/train/tiny.yaml", overrides)
    assert (cfg.model.context_dim, cfg.model.text_vocab) == (24, 0)  # encoder features: their width
    (data / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a `selfflow prepare` manifest"):
        load_config(TrainConfig, "configs/train/tiny.yaml", overrides)


def _sealed(run_dir, step, run_uid="run-a", **meta):
    """A checkpoint folder with the files selfflow writes, sealed by its manifest."""
    folder = checkpoints.checkpoint_dir(run_dir, step)
    folder.mkdir(parents=True)
    for name in ("ema.safetensors", "config.yaml", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (folder / name).write_bytes(f"{name} of step {step}".encode() * 100)
    (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"rank 1" * 100)
    checkpoints.write_state(folder, {"step": step})
    files = {p.name: checkpoints.hash_file(p) for p in folder.iterdir()}
    checkpoints.write_manifest(folder, files, {"step": step, "world_size": 2, "run_uid": run_uid, **meta})
    return folder


def test_manifest_verifies_sizes_and_hashes_and_names_the_bad_file(tmp_path):
    folder = _sealed(tmp_path, 10)
    manifest = checkpoints.verify(folder)
    assert manifest["step"] == 10 and set(manifest["files"]) == {
        "ema.safetensors",
        "config.yaml",
        "state.json",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    rank1 = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(rank1.read_bytes())
    data[17] ^= 0x01  # one bit
    rank1.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt differs from the manifest"):
        checkpoints.verify(folder)
    assert checkpoints.verify(folder, rank=0)["step"] == 10  # rank 0 never reads rank 1's file
    with pytest.raises(ValueError, match="rank_1"):
        checkpoints.verify(folder, rank=1)
    (folder / "ema.safetensors").write_bytes(b"short")
    with pytest.raises(ValueError, match=r"ema\.safetensors has 5 bytes, the manifest says"):
        checkpoints.verify(folder, rank=0)


def test_planted_file_damaged_manifest_and_unfinished_save_are_refused(tmp_path):
    folder = _sealed(tmp_path, 10)
    (folder / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"planted")
    with pytest.raises(ValueError, match="zero_pp_rank_2.*not in the manifest"):
        checkpoints.verify(folder, rank=0)
    other = _sealed(tmp_path, 20)
    manifest = (other / checkpoints.MANIFEST).read_bytes()
    (other / checkpoints.MANIFEST).write_bytes(manifest[:-40])
    with pytest.raises(ValueError, match="COMPLETE is damaged"):
        checkpoints.verify(other)
    (other / checkpoints.MANIFEST).write_text("ok\n")  # what selfflow < 0.2 wrote
    with pytest.raises(ValueError, match="cannot be verified"):
        checkpoints.verify(other)
    (other / checkpoints.MANIFEST).unlink()
    with pytest.raises(ValueError, match="a save that did not finish"):
        checkpoints.verify(other)
    with pytest.raises(checkpoints.CheckpointError, match="state.json"):
        checkpoints.write_manifest(other, {"ema.safetensors": {}, "config.yaml": {}}, {})


def test_prune_deletes_only_this_runs_older_sealed_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        _sealed(tmp_path, step)
    foreign = _sealed(tmp_path, 5, run_uid="run-b")  # another config's checkpoint in the same folder
    unfinished = checkpoints.checkpoint_dir(tmp_path, 15)
    unfinished.mkdir()
    gone = checkpoints.prune(tmp_path, keep=2, run_uid="run-a")
    assert [p.name for p in gone] == ["step_00000020", "step_00000010"]
    left = sorted(p.name for p in checkpoints.step_folders(tmp_path))
    assert left == ["step_00000005", "step_00000015", "step_00000030", "step_00000040"]
    assert checkpoints.verify(foreign)["run_uid"] == "run-b" and unfinished.is_dir()


def test_move_aside_never_overwrites(tmp_path):
    first = checkpoints.move_aside(_sealed(tmp_path, 10), "damaged")
    second = checkpoints.move_aside(_sealed(tmp_path, 10, run_uid="run-b"), "damaged again")
    assert first.name == "step_00000010" and second.name == "step_00000010.1"
    assert (
        first.with_name("step_00000010.why.txt").read_text() == "damaged\n"
        and checkpoints.verify(second)["run_uid"] == "run-b"
    )
    assert checkpoints.step_folders(tmp_path) == []  # refused/ is not a checkpoint of the run
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    moved = checkpoints.move_run_aside(tmp_path)
    assert (moved / "checkpoints" / "refused" / "step_00000010.1").is_dir() and (moved / "metrics.jsonl").is_file()
    assert moved.parent == tmp_path / "previous" and not (tmp_path / "checkpoints").exists()


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4, 5)]
    path.write_text("\n".join(rows) + '\n{"step": 6, "lo')  # torn last line of a killed process
    truncate_jsonl(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_zero3_term_gives_every_module_that_sat_out_a_zero_gradient():
    cfg = MMDiTConfig.tiny()
    cfg.modalities = {"image": [16, 16], "video": [16, 16], "audio": [8, 8]}
    cfg.projector_dim = 0
    model = build_mmdit(cfg)
    for p in model.parameters():  # away from the zero-initialised head, so every used module gets a gradient
        torch.nn.init.normal_(p, std=0.05)
    unused = _UnusedModules(model)
    ids = torch.zeros(2, 4, 4, dtype=torch.long)
    ids[..., 2] = torch.arange(4)

    def step(modality):
        model.zero_grad(set_to_none=True)
        out = model(
            torch.randn(2, 4, 16), torch.rand(2), ids, txt=torch.randn(2, 3, cfg.context_dim), modality=modality
        )
        zero = unused.zero(out)
        assert zero.item() == 0.0 and unused.ran == set()  # forgotten for the next step
        (out.sum() + zero).backward()

    step("video")
    step("image")
    assert torch.count_nonzero(model.img_in.weight.grad) > 0  # the modality that ran keeps its real gradient
    for module in (model.vid_in, model.final_layer.vid_linear):  # ran before, sat out now: an exact zero
        assert module.weight.grad is not None and torch.count_nonzero(module.weight.grad) == 0
    assert model.aud_in.weight.grad is None  # never ran: nothing can be stale


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_engine_learning_rate_and_non_finite_gradients_at_every_stage(stage):
    """`Engine.set_lr` reaches the optimizer (lr 0 leaves the weights alone, 1e-2 moves them), and a
    non-finite gradient behind a finite loss is not applied (`step()` says so)."""
    from selfflow.training.engine import init_distributed, shutdown

    info = init_distributed()
    try:
        torch.manual_seed(0)
        cfg = MMDiTConfig.tiny()
        cfg.modalities, cfg.projector_dim, cfg.context_dim = {"image": [16, 16]}, 0, 0
        model = build_mmdit(cfg)
        for p in model.parameters():  # away from the zero-initialised head, so gradients are not zero
            torch.nn.init.normal_(p, std=0.05)
        engine = Engine.create(model, DeepSpeedConfig(zero_stage=stage, bf16=False), 2, info.device)
        ids = torch.zeros(2, 4, 4, dtype=torch.long)
        moved, applied = [], []
        for lr, poison in ((0.0, False), (1e-2, False), (1e-2, True)):
            with engine.gathered():
                before = [p.detach().clone() for p in engine.module.parameters()]
            engine.set_lr(lr)
            out = engine.module(torch.randn(2, 4, 16), torch.rand(2), ids, modality="image")
            if poison:  # the loss stays finite, its gradient does not
                out.register_hook(lambda g: g * float("inf"))
            loss = out.pow(2).mean()
            assert torch.isfinite(loss)
            engine.backward(loss)
            applied.append(engine.step())
            assert engine.lr == lr
            with engine.gathered():
                after = [p.detach().clone() for p in engine.module.parameters()]
            moved.append(max((a - b).abs().max().item() for a, b in zip(after, before, strict=True)))
        assert applied == [True, True, False]
        assert moved[0] == 0.0 and moved[1] > 1e-4 and moved[2] == 0.0
    finally:
        shutdown()


def test_compile_is_refused_with_zero3():
    with pytest.raises(ConfigError, match="compile"):
        load_config(TrainConfig, "configs/train/tiny.yaml", ["compile=true", "deepspeed.zero_stage=3"])


def test_threads_per_process_shares_the_cores_among_the_nodes_processes(monkeypatch):
    import os

    from selfflow.training.run import threads_per_process

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert threads_per_process(0) == cores and threads_per_process(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))
    assert threads_per_process(0) == 1  # never zero
    with pytest.raises(ConfigError, match="threads"):
        load_config(TrainConfig, "configs/train/tiny.yaml", ["threads=-1"])


def test_tokens_wider_than_the_trunk_are_warned_about():
    from selfflow.training.train import WideTokenWarning, warn_wide_tokens

    cfg = MMDiTConfig.tiny()
    cfg.modalities = {"image": [48, 48], "audio": [cfg.hidden_size + 1, cfg.hidden_size + 1]}
    with pytest.warns(WideTokenWarning, match=r"model\.modalities\.audio"):
        warn_wide_tokens(cfg)
    cfg.modalities = {"image": [cfg.hidden_size, cfg.hidden_size]}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_wide_tokens(cfg)  # as wide as the trunk: fine
    cfg.modalities = {"audio": [cfg.hidden_size + 1, cfg.hidden_size + 1]}
    cfg.prediction = "x"  # the head predicts x0 (JiT): wide tokens are what it is for
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_wide_tokens(cfg)
