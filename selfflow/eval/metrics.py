"""Sample-quality metrics on precomputed features: FD, IS, precision/recall, KID, CLIP score.

Everything here takes features (Inception pool3, DINO, CLAP, CLIP embeddings, ...) as tensors;
the feature networks live elsewhere. Conventions follow the ADM evaluator (openai/guided-diffusion
`evaluations/evaluator.py`) for FID/sFID, IS and precision/recall, torch-fidelity / torchmetrics
for KID and torchmetrics for CLIP score. Statistics and linear algebra are float64: a float32
sum(x x^T) - N m m^T cancels when the mean is large against the spread and moves FD by percents
(tests/test_metrics.py::test_float64_path_matters), and FD itself is a difference of large traces.

    stats = FeatureStats(2048)
    for batch in loader:
        stats.update(inception(batch))                        # (N, 2048)
    torch.save(stats.state_dict(), "samples_stats.pt")        # or all-gather the state dicts and merge
    fid = stats.frechet_distance(FeatureStats.from_state_dict(torch.load("ref_stats.pt")))
    precision, recall = precision_recall(ref_feats, sample_feats)
    kid_mean, kid_std = kernel_inception_distance(ref_feats, sample_feats, subset_size=1000, subsets=100)
"""

import torch
from torch import Tensor


def _check_2d(name: str, x: Tensor, dim: int | None = None) -> None:
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------


def _psd_sqrt(sigma: Tensor) -> Tensor:
    """Symmetric PSD square root via eigh; tiny negative eigenvalues from round-off are clamped to 0."""
    evals, evecs = torch.linalg.eigh(sigma)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) (Dowson & Landau 1982; FID, Heusel et al. 2017).

    Computed in float64. S1 S2 is similar to the symmetric PSD matrix S1^(1/2) S2 S1^(1/2) = A A^T
    with A = S1^(1/2) S2^(1/2), so Tr((S1 S2)^(1/2)) is the sum of the singular values of A (its
    nuclear norm). This avoids the complex round-off of a general `sqrtm(S1 @ S2)` (which the ADM
    evaluator discards with `.real`), and, unlike square-rooting the eigenvalues of A A^T, it does
    not turn an absolute error eps * |A|^2 in a near-zero eigenvalue into sqrt(eps) * |A| in the
    trace: singular values are perturbed by at most eps * |A| (Weyl), so singular (N < D) and
    rank-deficient covariances are fine too.
    """
    mu1, mu2 = torch.as_tensor(mu1).double(), torch.as_tensor(mu2).double()
    sigma1, sigma2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    d = mu1.shape[-1]
    for name, t, shape in (
        ("mu1", mu1, (d,)),
        ("mu2", mu2, (d,)),
        ("sigma1", sigma1, (d, d)),
        ("sigma2", sigma2, (d, d)),
    ):
        if tuple(t.shape) != shape:
            raise ValueError(f"frechet_distance: {name} must have shape {shape} (from mu1), got {tuple(t.shape)}")
    sigma2 = sigma2.to(sigma1.device)
    tr_covmean = torch.linalg.svdvals(_psd_sqrt(sigma1) @ _psd_sqrt(sigma2)).sum()
    diff = mu1 - mu2.to(mu1.device)
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


class FeatureStats:
    """Streaming count, float64 mean and float64 scatter sum((x - mean)(x - mean)^T) of (N, D) features.

    Batches and ranks combine with the pairwise update of Chan, Golub & LeVeque (1979), which
    never forms E[x x^T] - mean mean^T and so does not cancel catastrophically when the mean is
    large compared with the spread. `merge` is exact up to round-off in any order.
    """

    def __init__(self, dim: int, device: torch.device | str | None = None):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def _combine(self, n_b: int, mean_b: Tensor, scatter_b: Tensor) -> None:
        n_a, n = self.count, self.count + n_b
        if n_b == 0:
            return
        delta = mean_b.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.scatter = self.scatter + scatter_b.to(self.mean.device) + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def update(self, features: Tensor) -> "FeatureStats":
        """Add a batch (N, D) in place; returns self."""
        _check_2d("FeatureStats.update: features", features, self.dim)
        x = features.detach().to(device=self.mean.device, dtype=torch.float64)
        mean_b = x.mean(0)
        xc = x - mean_b
        self._combine(x.shape[0], mean_b, xc.T @ xc)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Statistics of the union of both feature sets, as a new object (neither input changes)."""
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dims differ, {self.dim} vs {other.dim}")
        out = FeatureStats.from_state_dict(self.state_dict())
        out._combine(other.count, other.mean, other.scatter)
        return out

    @property
    def covariance(self) -> Tensor:
        """Unbiased (N - 1) covariance, as numpy.cov and the ADM evaluator."""
        if self.count < 2:
            raise ValueError(f"FeatureStats.covariance needs at least 2 samples, have {self.count}")
        return self.scatter / (self.count - 1)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors (count, mean, scatter): save with torch.save or all-gather across ranks."""
        return {
            "count": torch.tensor(self.count, dtype=torch.int64),
            "mean": self.mean.clone(),
            "scatter": self.scatter.clone(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "FeatureStats":
        missing = {"count", "mean", "scatter"} - set(state)
        if missing:
            raise ValueError(f"FeatureStats.from_state_dict: missing keys {sorted(missing)}")
        stats = cls(state["mean"].shape[0], device=state["mean"].device)
        if tuple(state["scatter"].shape) != (stats.dim, stats.dim):
            raise ValueError(
                f"FeatureStats: scatter shape {tuple(state['scatter'].shape)} != ({stats.dim}, {stats.dim})"
            )
        stats.count = int(state["count"])
        stats.mean = state["mean"].double().clone()
        stats.scatter = state["scatter"].double().clone()
        return stats

    def frechet_distance(self, other: "FeatureStats") -> float:
        return frechet_distance(self.mean, self.covariance, other.mean, other.covariance)


def features_frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between two sets of features `(N, D)` (streaming float64 statistics)."""
    stats = [FeatureStats(x.shape[1]).update(x) for x in (a, b)]
    return stats[0].frechet_distance(stats[1])


# ---------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------


def inception_score(scores: Tensor, splits: int = 10, from_logits: bool = True) -> tuple[float, float]:
    """(mean, std) over `splits` consecutive chunks of exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016).

    `scores` (N, C) are classifier logits (`from_logits=True`) or probabilities. Chunks are
    [i N // splits, (i + 1) N // splits) as in torch-fidelity (without its shuffle); with N = 50k
    and 10 splits these are the ADM evaluator's 5000-sample chunks. std is the population std.
    """
    _check_2d("inception_score: scores", scores)
    n = scores.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"inception_score: splits must be in [1, N={n}], got {splits}")
    x = scores.detach().double()
    log_p = x.log_softmax(dim=1) if from_logits else x.log()
    p = log_p.exp()
    values = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_i, log_p_i = p[lo:hi], log_p[lo:hi]
        log_py = p_i.mean(0, keepdim=True).log()
        kl = torch.where(p_i > 0, p_i * (log_p_i - log_py), 0.0).sum(1).mean()  # 0 log 0 = 0
        values.append(kl.exp())
    values = torch.stack(values)
    return float(values.mean()), float(values.std(correction=0))


# ---------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019)
# ---------------------------------------------------------------------------------------------


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances (len(a), len(b)), clamped at 0 as in the ADM DistanceBlock."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp(min=0)


def knn_radii(features: Tensor, k: int = 3, chunk_size: int = 1000) -> Tensor:
    """Squared distance from each point to its k-th nearest other point (the point itself is index 0)."""
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"knn_radii: need 1 <= k < N, got k={k}, N={features.shape[0]}")
    x = features.double()
    return torch.cat([_sq_dists(c, x).kthvalue(k + 1, dim=1).values for c in x.split(chunk_size)])


def _fraction_inside(points: Tensor, centres: Tensor, radii: Tensor, chunk_size: int) -> float:
    """Fraction of `points` within radius of at least one centre; (chunk_size, len(centres)) at a time."""
    inside = [(_sq_dists(c, centres) <= radii).any(1) for c in points.double().split(chunk_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall with k-NN hyperspheres, as the ADM evaluator's ManifoldEstimator.

    precision: fraction of `fake` inside the manifold of `real` (within the k-th NN radius of some
    real point); recall: fraction of `real` inside the manifold of `fake`. Distances are float64 and
    computed `chunk_size` rows at a time, so memory is O(chunk_size * N), never O(N^2).
    """
    _check_2d("precision_recall: real", real)
    _check_2d("precision_recall: fake", fake, real.shape[1])
    real, fake = real.double(), fake.to(device=real.device, dtype=torch.float64)
    precision = _fraction_inside(fake, real, knn_radii(real, k, chunk_size), chunk_size)
    recall = _fraction_inside(real, fake, knn_radii(fake, k, chunk_size), chunk_size)
    return precision, recall


# ---------------------------------------------------------------------------------------------
# Kernel Inception Distance (Binkowski et al. 2018)
# ---------------------------------------------------------------------------------------------


def poly_mmd2(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3; x and y have the same size m.

    (sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m^2,
    the estimator of torch-fidelity's and torchmetrics' KID.
    """
    x, y = x.double(), y.double()
    m, d = x.shape

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.T / d + 1) ** 3

    k_xx, k_yy = kernel(x, x), kernel(y, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * kernel(x, y).sum() / m**2)


def kernel_inception_distance(
    real: Tensor, fake: Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """(mean, population std) of `poly_mmd2` over `subsets` random subsets of `subset_size` from each set.

    Subsets are drawn without replacement from a CPU generator seeded with `seed`: per subset,
    `randperm(len(real))` then `randperm(len(fake))`, first `subset_size` indices, the sampling of
    torchmetrics' KernelInceptionDistance after `torch.manual_seed(seed)`. Defaults are theirs.
    """
    _check_2d("kernel_inception_distance: real", real)
    _check_2d("kernel_inception_distance: fake", fake, real.shape[1])
    if not 2 <= subset_size <= min(len(real), len(fake)):
        raise ValueError(f"KID subset_size={subset_size} must be in [2, min(N_real={len(real)}, N_fake={len(fake)})]")
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        idx_real = torch.randperm(len(real), generator=gen)[:subset_size]
        idx_fake = torch.randperm(len(fake), generator=gen)[:subset_size]
        values.append(poly_mmd2(real[idx_real.to(real.device)], fake[idx_fake.to(fake.device)]))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(correction=0))


# ---------------------------------------------------------------------------------------------
# CLIP score (Hessel et al. 2021, with torchmetrics' scale)
# ---------------------------------------------------------------------------------------------


def clip_score(image_emb: Tensor, text_emb: Tensor) -> float:
    """mean_i 100 * max(cos(image_emb_i, text_emb_i), 0) over paired CLIP embeddings (N, D).

    This is the formula torchmetrics documents for CLIPScore (weight 100 instead of the paper's 2.5).
    Its code clamps the batch mean instead of each pair; the two agree whenever every pair has
    cos >= 0, which is the case for real captions. Embeddings need not be normalised.
    """
    _check_2d("clip_score: image_emb", image_emb)
    _check_2d("clip_score: text_emb", text_emb, image_emb.shape[1])
    if len(image_emb) != len(text_emb):
        raise ValueError(f"clip_score: {len(image_emb)} image embeddings but {len(text_emb)} text embeddings")
    img = image_emb.double() / image_emb.double().norm(dim=1, keepdim=True)
    txt = text_emb.double() / text_emb.double().norm(dim=1, keepdim=True)
    cos = (img * txt.to(img.device)).sum(1)
    return float(100 * cos.clamp(min=0).mean())


__all__ = [
    "FeatureStats",
    "features_frechet_distance",
    "clip_score",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "knn_radii",
    "poly_mmd2",
    "precision_recall",
]
