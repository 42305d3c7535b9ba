"""Weight loading: wrappers, prefixes, reports and shape errors."""

import pytest
import torch
from hostile import write_evil_pickle
from safetensors.torch import save_file

from selfflow.backbone.checkpoint import load_weights
from selfflow.backbone.sit import SiT, SiTConfig

CFG = SiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)


def random_state() -> dict:
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in SiT(CFG).state_dict().items()}


def assert_loaded(model, state):
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"model": s, "opt": {"lr": 1.0}},
        lambda s: {"ema": s, "model": {k: torch.zeros_like(v) for k, v in s.items()}, "args": 1},
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
        lambda s: {"model": {f"_orig_mod.module.{k}": v for k, v in s.items()}},
    ],
    ids=["bare", "model", "ema_first", "module_prefix", "compiled_ddp"],
)
def test_unwraps_and_strips(tmp_path, wrap):
    state = random_state()
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(state), path)
    model = SiT(CFG)
    report = load_weights(model, path, strict=True)
    assert report.missing == [] and report.unexpected == []
    assert_loaded(model, state)


def test_safetensors_file(tmp_path):
    state = random_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    model = SiT(CFG)
    load_weights(model, tmp_path / "w.safetensors", strict=True)
    assert_loaded(model, state)


def test_reports_missing_and_unexpected():
    state = random_state()
    state.pop("projector.linear1.weight")
    state["extra.weight"] = torch.zeros(3)
    model = SiT(CFG)
    report = load_weights(model, state)
    assert report.missing == ["projector.linear1.weight"]
    assert report.unexpected == ["extra.weight"]
    assert "projector.linear1.weight" in str(report)
    with pytest.raises(ValueError, match="missing keys"):
        load_weights(SiT(CFG), state, strict=True)


def test_shape_mismatch_names_key_and_shapes():
    state = random_state()
    state["y_embedder.embedding_table.weight"] = torch.zeros(7, 32)
    with pytest.raises(ValueError, match=r"y_embedder\.embedding_table\.weight.*\(7, 32\).*\(5, 32\)"):
        load_weights(SiT(CFG), state)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(SiT(CFG), tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"bad\.pt"):
        load_weights(SiT(CFG), bad)
    good = tmp_path / "good.pt"
    torch.save({"model": random_state()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="cannot read checkpoint.*truncated.pt"):
        load_weights(SiT(CFG), truncated)
    flipped = tmp_path / "flipped.safetensors"
    save_file(random_state(), str(flipped))
    flipped.write_bytes(b"\xff" * 8 + flipped.read_bytes()[8:])  # the header length
    with pytest.raises(ValueError, match="cannot read checkpoint.*flipped.safetensors"):
        load_weights(SiT(CFG), flipped)


def test_checkpoint_with_an_argparse_namespace(tmp_path):
    """Training checkpoints that pickle an argparse Namespace (SiT, REPA) load with the weights-only unpickler."""
    import argparse

    state = random_state()
    torch.save({"ema": state, "args": argparse.Namespace(lr=1e-4, model="SiT-XL/2")}, tmp_path / "train.pt")
    model = SiT(CFG)
    report = load_weights(model, tmp_path / "train.pt", strict=True)
    assert report.wrapper == "ema"
    assert_loaded(model, state)


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    write_evil_pickle(evil, marker, {"ema": random_state()})
    refused = r"refusing to unpickle .*evil\.pt.*GLOBAL.*\n.*convert it once to safetensors"
    with pytest.raises(ValueError, match=refused):
        load_weights(SiT(CFG), evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file is live: an unrestricted load runs its code
    assert marker.exists()
