"""Metrics through the standard networks (local weights only), for `selfflow eval`.

Each function loads its network from a local path, records the weights' sha256 into `weights`,
and returns numbers computed with `selfflow.eval.metrics` (float64 Frechet distances):

    inception_metrics   image: FID, sFID, IS, precision / recall (k = 3), KID; video: frame-wise FID
    dinov2_distance     FD-DINO (CLS embeddings of DINOv2)
    clip_score          100 * cos(image, caption) of CLIP, clamped at 0, averaged
    clap_distance       FAD of CLAP audio embeddings

Media come in as `selfflow eval` decodes them: images `(N, 3, H, W)`, videos `(N, 3, T, H, W)` in
[-1, 1]; audio `(N, C, S)`.
"""

import torch
from torch import Tensor

from selfflow.eval import metrics
from selfflow.eval.media import to_uint8


def _frames(x: Tensor, name: str):
    """uint8 NHWC pictures: the images, or every frame of every video."""
    pictures = to_uint8(x)  # (N, H, W, 3) or (N, T, H, W, 3)
    return pictures.reshape(-1, *pictures.shape[-3:])


def _stats(features: Tensor) -> metrics.FeatureStats:
    return metrics.FeatureStats(features.shape[1]).update(features)


def inception_metrics(path: str, real: Tensor, fake: Tensor, name: str, weights: dict) -> dict:
    from selfflow.eval.inception import load_inception

    net = load_inception(path)
    weights["inception"] = net.sha256
    feats = []
    for x in (real, fake):
        pictures = _frames(x, name)
        parts = [net.embed(pictures[i : i + 64]) for i in range(0, len(pictures), 64)]
        feats.append({k: torch.cat([getattr(p, k) for p in parts]) for k in ("pool", "spatial", "logits")})
    real_f, fake_f = feats
    if name == "video":
        return {"fid_frames": _stats(real_f["pool"]).frechet_distance(_stats(fake_f["pool"]))}
    precision, recall = metrics.precision_recall(real_f["pool"], fake_f["pool"], k=3)
    subset = min(1000, len(real_f["pool"]), len(fake_f["pool"]))
    kid, _ = metrics.kernel_inception_distance(real_f["pool"], fake_f["pool"], subset_size=subset, subsets=100)
    inception_score, _ = metrics.inception_score(fake_f["logits"], splits=min(10, len(fake_f["logits"])))
    return {
        "fid": _stats(real_f["pool"]).frechet_distance(_stats(fake_f["pool"])),
        "sfid": _stats(real_f["spatial"]).frechet_distance(_stats(fake_f["spatial"])),
        "inception_score": inception_score,
        "precision": precision,
        "recall": recall,
        "kid": kid,
    }


def dinov2_distance(path: str, real: Tensor, fake: Tensor, weights: dict) -> float:
    from selfflow.eval.encoders import load_dinov2

    net = load_dinov2(path)
    weights["dinov2"] = net.sha256
    real_f, fake_f = (net.embed(to_uint8(x)) for x in (real, fake))
    return _stats(real_f).frechet_distance(_stats(fake_f))


def clip_score(path: str, fake: Tensor, captions: list[str], weights: dict) -> float:
    from selfflow.eval.encoders import load_clip

    net = load_clip(path)
    weights["clip"] = net.sha256
    return metrics.clip_score(net.embed(to_uint8(fake)), net.embed_text(captions[: len(fake)]))


def clap_distance(path: str, real: Tensor, fake: Tensor, sample_rate: int, weights: dict) -> float:
    from selfflow.eval.encoders import load_clap

    net = load_clap(path)
    weights["clap"] = net.sha256
    real_f, fake_f = (net.embed(list(x.mean(dim=1)), sample_rate) for x in (real, fake))
    return _stats(real_f).frechet_distance(_stats(fake_f))
