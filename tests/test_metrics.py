"""Sample-quality metrics against independent oracles on identical features.

Oracles: numpy mean/cov + `scipy.linalg.sqrtm` FD (the ADM evaluator's formula), closed forms,
numpy IS as in the ADM evaluator, torch-fidelity's IS / KID / precision-recall code, torchmetrics'
KID metric and its CLIP score run on a tiny random CLIP, brute-force numpy precision/recall.
"""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

from selfflow.eval.metrics import (
    FeatureStats,
    clip_score,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    knn_radii,
    poly_mmd2,
    precision_recall,
)


def correlated(n: int, d: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """n draws of scale * N(0, M M^T) + offset; M depends only on d, so equal scale/offset is one distribution."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) / d**0.5
    return (
        torch.randn(n, d, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64) @ mix * scale
        + offset
    )


def scipy_fd(x: np.ndarray, y: np.ndarray) -> float:
    """The ADM evaluator's FID: numpy mean / np.cov, scipy sqrtm of sigma1 @ sigma2."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------
# Frechet distance and FeatureStats
# ---------------------------------------------------------------------------------------------


def test_fd_matches_scipy_sqrtm():
    x, y = correlated(600, 48, seed=0), correlated(500, 48, seed=1, scale=1.3, offset=0.2)
    ref = scipy_fd(x.numpy(), y.numpy())
    stats_x, stats_y = FeatureStats(48).update(x), FeatureStats(48).update(y)
    assert ref > 1.0
    assert stats_x.frechet_distance(stats_y) == pytest.approx(ref, rel=1e-9)
    fd = frechet_distance(x.mean(0), torch.from_numpy(np.cov(x.numpy(), rowvar=False)), y.mean(0), torch.cov(y.T))
    assert fd == pytest.approx(ref, rel=1e-9)


def test_fd_diagonal_closed_form():
    g = torch.Generator().manual_seed(2)
    mu1, mu2 = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    a, b = torch.rand(32, generator=g, dtype=torch.float64) * 3, torch.rand(32, generator=g, dtype=torch.float64) * 3
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(float(expected), rel=1e-10)


def test_fd_zero_on_itself_and_symmetric():
    x, y = correlated(400, 32, seed=3), correlated(300, 32, seed=4, scale=0.7)
    sx, sy = FeatureStats(32).update(x), FeatureStats(32).update(y)
    assert abs(sx.frechet_distance(sx)) < 1e-10 * float(sx.covariance.trace())
    assert sx.frechet_distance(sy) == pytest.approx(sy.frechet_distance(sx), rel=1e-10)
    # Rank-deficient covariance (N < D): S1 S2 is singular, the eigenvalue route still gives 0.
    few = FeatureStats(32).update(correlated(10, 32, seed=5))
    assert abs(few.frechet_distance(few)) < 1e-12 * float(few.covariance.trace())


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(torch.zeros(4), torch.eye(4), torch.zeros(4), torch.eye(5))


def test_streaming_merge_matches_numpy_in_any_order():
    x = correlated(517, 24, seed=6, offset=50.0).float()  # float32 input, as networks produce
    ref_mean, ref_cov = x.double().numpy().mean(0), np.cov(x.double().numpy(), rowvar=False)
    batches = torch.split(x, [1, 7, 100, 33, 0, 376])
    sequential = FeatureStats(24)
    for b in batches:
        sequential.update(b)
    parts = [FeatureStats(24).update(b) for b in batches]
    reversed_merge = FeatureStats(24)
    for p in reversed(parts):
        reversed_merge = reversed_merge.merge(p)
    tree = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3]).merge(parts[4].merge(parts[5])))
    for stats in (sequential, reversed_merge, tree):
        assert stats.count == 517
        np.testing.assert_allclose(stats.mean.numpy(), ref_mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.covariance.numpy(), ref_cov, rtol=1e-9, atol=1e-12)
    assert parts[0].count == 1  # merge returns a new object and leaves its inputs alone


def test_state_dict_round_trip_and_gather(tmp_path):
    x = correlated(300, 16, seed=7)
    ranks = [FeatureStats(16).update(chunk) for chunk in x.chunk(3)]
    for i, r in enumerate(ranks):
        torch.save(r.state_dict(), tmp_path / f"rank{i}.pt")
    loaded = [FeatureStats.from_state_dict(torch.load(tmp_path / f"rank{i}.pt", weights_only=True)) for i in range(3)]
    assert all(isinstance(v, torch.Tensor) for v in ranks[0].state_dict().values())
    total = loaded[0].merge(loaded[1]).merge(loaded[2])
    np.testing.assert_allclose(total.covariance.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="scatter"):
        FeatureStats.from_state_dict({"count": torch.tensor(1), "mean": torch.zeros(3)})
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats(3).update(torch.zeros(1, 3)).covariance


def test_float64_path_matters():
    """Large mean offset: float32 sum(x x^T) - N m m^T cancels and moves FD by percents; float64 does not."""
    x = correlated(4000, 128, seed=8, offset=300.0).float()
    y = correlated(4000, 128, seed=9, scale=1.05, offset=300.0).float()
    ref = scipy_fd(x.double().numpy(), y.double().numpy())

    def float32_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = z.sum(0) / len(z)
        return m, (z.T @ z - len(z) * torch.outer(m, m)) / (len(z) - 1)

    naive = frechet_distance(*float32_stats(x), *float32_stats(y))
    ours = FeatureStats(128).update(x).frechet_distance(FeatureStats(128).update(y))
    assert abs(naive - ref) / ref > 0.01
    assert ours == pytest.approx(ref, rel=1e-8)


# ---------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------


def numpy_is(probs: np.ndarray, split_size: int) -> tuple[float, float]:
    """The ADM evaluator's `compute_inception_score` loop (plus the std it does not report)."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_numpy_and_torch_fidelity():
    logits = torch.randn(1000, 20, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 3
    probs = logits.softmax(1)
    ref_mean, ref_std = numpy_is(probs.numpy(), split_size=100)
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(ref_mean, rel=1e-12) and std == pytest.approx(ref_std, rel=1e-9)
    assert inception_score(probs, splits=10, from_logits=False) == pytest.approx((ref_mean, ref_std), rel=1e-9)
    uneven = logits[:997]  # split boundaries i * N // splits
    tf = isc_features_to_metric(uneven, splits=7, shuffle=False)
    mean, std = inception_score(uneven, splits=7)
    assert mean == pytest.approx(tf["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(tf["inception_score_std"], rel=1e-9)


def test_inception_score_closed_forms():
    one_hot = torch.eye(8).repeat(5, 1)  # confident and uniformly spread over 8 classes: IS = 8
    assert inception_score(one_hot, splits=1, from_logits=False) == pytest.approx((8.0, 0.0), abs=1e-12)
    same = torch.randn(1, 8).repeat(40, 1)  # identical predictions: p(y|x) = p(y), IS = 1
    assert inception_score(same, splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="splits"):
        inception_score(same, splits=41)


# ---------------------------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------------------------


def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(a: np.ndarray) -> np.ndarray:
        return np.sort(((a[:, None] - a[None]) ** 2).sum(-1), axis=1)[:, k]

    d = ((fake[:, None] - real[None]) ** 2).sum(-1)  # (N_fake, N_real)
    precision = (d <= radii(real)[None]).any(1).mean()
    recall = (radii(fake)[None] >= d.T).any(1).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    real = correlated(70, 6, seed=11)
    fake = correlated(55, 6, seed=12, scale=1.5, offset=0.8)
    expected = brute_force_pr(real.numpy(), fake.numpy(), k)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    assert precision_recall(real, fake, k=k, chunk_size=7) == pytest.approx(expected, abs=1e-15)
    tf_precision, tf_recall = calculate_precision_recall_full(fake, real, neighborhood=k)  # fake first there
    assert precision_recall(real, fake, k=k) == pytest.approx((tf_precision, tf_recall), abs=1e-6)  # theirs: float32


def test_precision_recall_known_answers():
    real = correlated(50, 8, seed=13)
    assert precision_recall(real, real.clone(), chunk_size=16) == (1.0, 1.0)
    assert precision_recall(real, correlated(40, 8, seed=14) + 100.0) == (0.0, 0.0)
    radii = knn_radii(real, k=3, chunk_size=9)
    d = torch.cdist(real, real) ** 2
    torch.testing.assert_close(radii, d.sort(1).values[:, 3])
    with pytest.raises(ValueError, match="k=50"):
        knn_radii(real, k=50)


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------


def test_poly_mmd2_matches_torchmetrics():
    x, y = correlated(200, 10, seed=15), correlated(200, 10, seed=16, scale=1.5)
    same = correlated(200, 10, seed=17)  # x's distribution: the unbiased estimate is near 0, either sign
    assert poly_mmd2(x, y) == pytest.approx(float(poly_mmd(x, y)), rel=1e-12)
    assert poly_mmd2(x, same) == pytest.approx(float(poly_mmd(x, same)), rel=1e-10)
    assert poly_mmd2(x, y) > 10 * abs(poly_mmd2(x, same))


def test_kid_whole_set_matches_torch_fidelity():
    real, fake = correlated(80, 12, seed=17), correlated(80, 12, seed=18, offset=0.3)
    tf = kid_features_to_metric(
        fake, real, kid_subsets=1, kid_subset_size=80, kid_kernel="poly", kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1, rng_seed=0, verbose=False,
    )  # fmt: skip
    mean, std = kernel_inception_distance(real, fake, subset_size=80, subsets=1)
    assert mean == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-12) and std == 0.0


def test_kid_subsets_match_torchmetrics():
    real, fake = correlated(120, 16, seed=19), correlated(90, 16, seed=20, scale=1.2)
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=6, subset_size=40)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(123)
    tm_mean, tm_std = metric.compute()
    mean, std = kernel_inception_distance(real, fake, subset_size=40, subsets=6, seed=123)
    assert mean == pytest.approx(float(tm_mean), rel=1e-10) and std == pytest.approx(float(tm_std), rel=1e-8)
    assert std > 0 and kernel_inception_distance(real, fake, 40, 6, seed=124)[0] != mean
    with pytest.raises(ValueError, match="subset_size=91"):
        kernel_inception_distance(real, fake, subset_size=91)


# ---------------------------------------------------------------------------------------------
# CLIP score
# ---------------------------------------------------------------------------------------------


def tiny_clip(tmp_path, seed: int):
    """A random 1-layer CLIP with a character-level tokenizer written to tmp_path (no downloads)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab |= {c + "</w>": i + 26 for c, i in list(vocab.items())}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>")
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text = dict(layers, vocab_size=54, max_position_embeddings=16, bos_token_id=52, eos_token_id=53, pad_token_id=53)
    cfg = CLIPConfig(text_config=text, vision_config=dict(layers, image_size=16, patch_size=8), projection_dim=16)

    class Embeddings(CLIPModel):
        """torchmetrics 1.9 expects tensors from get_*_features; transformers 5 returns the output object."""

        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    torch.manual_seed(seed)
    return Embeddings(cfg).eval(), CLIPProcessor(image_processor=images, tokenizer=tok)


def test_clip_score_matches_torchmetrics_on_tiny_clip(tmp_path):
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    model, processor = tiny_clip(tmp_path, seed=3)  # seed 3: pairs with cos > 0 and < 0
    images = torch.randint(0, 256, (8, 3, 20, 20), generator=torch.Generator().manual_seed(21), dtype=torch.uint8)
    texts = ["a cat", "a dog", "red car", "blue sky", "green tree", "old boat", "tall tower", "small bird"]
    with torch.no_grad():
        inputs = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        img_emb = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt_emb = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        # torchmetrics on one pair is max(100 cos, 0): per-pair scores, then the mean.
        per_pair = [
            float(tm_clip_score(im, t, model_name_or_path=lambda: (model, processor)))
            for im, t in zip(images, texts, strict=True)
        ]
    assert min(per_pair) == 0.0 and max(per_pair) > 0.0  # both sides of the clamp are exercised
    assert clip_score(img_emb, txt_emb) == pytest.approx(float(np.mean(per_pair)), rel=1e-5)


def test_clip_score_closed_form():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    txt = torch.tensor([[5.0, 0.0], [0.0, -1.0], [1.0, 0.0]])  # cos = 1, -1, 1/sqrt(2)
    assert clip_score(img, txt) == pytest.approx(100 * (1 + 0 + 2**-0.5) / 3, rel=1e-12)
    with pytest.raises(ValueError, match="3 image embeddings but 2"):
        clip_score(img, txt[:2])
