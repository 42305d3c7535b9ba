"""Metrics through the standard networks (local weights only), for `selfflow eval`.

`StandardNets` loads the networks whose local paths are given, once, and records their weights'
sha256. `embed` turns one process's media into per-item features (under several processes each
embeds its share and the shares are concatenated in item order); `scores` computes the numbers from
everyone's features with `selfflow.eval.metrics` (float64 Frechet distances):

    inception     image: FID, sFID, IS, precision / recall (k = 3), KID; video: frame-wise FID
    dinov2        FD-DINO (CLS embeddings of DINOv2)
    clip          CLIP score: 100 * cos(image, caption), clamped at 0, averaged
    clap          FAD of CLAP audio embeddings

Media come in as `selfflow eval` decodes them: images `(N, 3, H, W)`, videos `(N, 3, T, H, W)` in
[-1, 1]; audio `(N, C, S)`.
"""

import torch
from torch import Tensor

from selfflow.eval import metrics
from selfflow.eval.media import to_uint8


def _frames(x: Tensor):
    """uint8 NHWC pictures: the images, or every frame of every video."""
    pictures = to_uint8(x)  # (N, H, W, 3) or (N, T, H, W, 3)
    return pictures.reshape(-1, *pictures.shape[-3:])


class StandardNets:
    """The standard networks configured for one modality (`paths`: inception, dinov2, clip, clap ->
    local path or None), loaded on construction; `weights` maps each to its sha256."""

    def __init__(self, name: str, paths: dict[str, str | None], sample_rate: int | None = None):
        self.name, self.sample_rate, self.nets, self.weights = name, sample_rate, {}, {}
        wanted = {"image": ("inception", "dinov2", "clip"), "video": ("inception",), "audio": ("clap",)}[name]
        for kind in wanted:
            if paths.get(kind):
                self.nets[kind] = _load(kind, paths[kind])
                self.weights[kind] = self.nets[kind].sha256

    def embed(self, x: Tensor, captions: list[str] | None = None) -> dict[str, Tensor]:
        """Per-item features of media `x` (with `captions`: also CLIP's caption embeddings)."""
        out = {}
        if "inception" in self.nets:
            pictures = _frames(x)
            parts = [self.nets["inception"].embed(pictures[i : i + 64]) for i in range(0, len(pictures), 64)]
            for key in ("pool", "spatial", "logits"):
                out[f"inception_{key}"] = torch.cat([getattr(p, key) for p in parts]) if parts else torch.empty(0)
        if "dinov2" in self.nets:
            out["dinov2"] = self.nets["dinov2"].embed(to_uint8(x))
        if "clip" in self.nets and captions is not None:
            out["clip_image"] = self.nets["clip"].embed(to_uint8(x))
            out["clip_text"] = self.nets["clip"].embed_text(captions[: len(x)])
        if "clap" in self.nets:
            out["clap"] = self.nets["clap"].embed(list(x.mean(dim=1)), self.sample_rate)
        return out

    def scores(self, real: dict[str, Tensor], fake: dict[str, Tensor]) -> dict[str, float]:
        """The metrics from all items' features of the real items and of the samples."""
        out = {}
        if "inception" in self.nets and self.name == "video":
            out["fid_frames"] = metrics.features_frechet_distance(real["inception_pool"], fake["inception_pool"])
        elif "inception" in self.nets:
            pool_r, pool_f = real["inception_pool"], fake["inception_pool"]
            precision, recall = metrics.precision_recall(pool_r, pool_f, k=3)
            subset = min(1000, len(pool_r), len(pool_f))
            kid, _ = metrics.kernel_inception_distance(pool_r, pool_f, subset_size=subset, subsets=100)
            logits = fake["inception_logits"]
            inception_score, _ = metrics.inception_score(logits, splits=min(10, len(logits)))
            out.update(
                fid=metrics.features_frechet_distance(pool_r, pool_f),
                sfid=metrics.features_frechet_distance(real["inception_spatial"], fake["inception_spatial"]),
                inception_score=inception_score,
                precision=precision,
                recall=recall,
                kid=kid,
            )
        if "dinov2" in self.nets:
            out["fd_dinov2"] = metrics.features_frechet_distance(real["dinov2"], fake["dinov2"])
        if "clip" in self.nets:
            out["clip_score"] = metrics.clip_score(fake["clip_image"], fake["clip_text"])
        if "clap" in self.nets:
            out["fad"] = metrics.features_frechet_distance(real["clap"], fake["clap"])
        return out


def _load(kind: str, path: str):
    if kind == "inception":
        from selfflow.eval.inception import load_inception

        return load_inception(path)
    from selfflow.eval import encoders

    return {"dinov2": encoders.load_dinov2, "clip": encoders.load_clip, "clap": encoders.load_clap}[kind](path)
