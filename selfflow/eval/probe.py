"""Linear probe: how well a trunk's block-`l` features predict the built-in attributes, clean and noised.

For the first `items` items of a modality's prepared data, the trunk sees the latent tokens noised to
level t, `x_t = (1 - t) x0 + t noise`, with no caption, so the features can only know what the media
shows; the data tokens' hidden state after block `layer` is mean-pooled to one vector per item. The
noise is fixed: one generator seeded by `seed` draws it in item order, so every model and every
level sees the same noise. A multi-label logistic regression (full-batch, standardised features,
fixed seed) is fitted on the first 75% and scored on the last 25% against the attributes' 0/1
targets of `builtin_features.attribute_targets`. Reported per level: mean per-label accuracy, and
what always guessing each label's majority answer from the training split scores on the same test
split.

The probe runs at several levels because t = 0 alone says little about what training shaped:
logit-normal timesteps (mean 0, std 1, unshifted: the demo's image and video) put 0.16% of their
mass below t = 0.05, while t = 0.25 and 0.5 lie in the band training samples most (the density of
logit-normal(0, 1) peaks at t = 0.5).

    linear_probes(model, "data/demo/latents", "image", layer=2, levels=[0.0, 0.25, 0.5])
    # {"linear_probe": {"t": 0.0, "accuracy": 0.9, "majority": 0.76, ...}, "linear_probe_t0.25": {...}, ...}
"""

import numpy as np
import torch
import torch.nn.functional as F

from selfflow.backbone.mmdit import MMDiT
from selfflow.eval.builtin_features import attribute_targets
from selfflow.eval.generate import read_eval_set
from selfflow.flow.paths import interpolate


def probe_key(t: float) -> str:
    """The metric name of the probe at noise level `t`: `linear_probe` at t = 0 (the name the clean
    probe always had), `linear_probe_t0.25` at t = 0.25."""
    return "linear_probe" if t == 0 else f"linear_probe_t{t:g}"


@torch.no_grad()
def probe_features(model: MMDiT, x0, ids, modality: str, layer: int, t: float, seed: int) -> torch.Tensor:
    """Mean-pooled block-`layer` hidden states `(N, D)` of tokens noised to level `t` (no caption)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x, pos in zip(x0.split(64), ids.split(64), strict=True):
        tt = torch.full((len(x),), t)
        noisy = interpolate(x, torch.randn(x.shape, generator=gen), tt)
        h = model.hidden_states(noisy.to(device), tt.to(device), pos.to(device), layer=layer, modality=modality)
        out.append(h.float().mean(dim=1).cpu())
    return torch.cat(out)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, steps: int = 300, weight_decay: float = 1e-3) -> torch.nn.Linear:
    """Multi-label logistic regression by full-batch L-BFGS (deterministic)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.LBFGS(head.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(x), y) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def score_probe(feats: torch.Tensor, targets: torch.Tensor) -> dict:
    """Fit on the first 75% of `(feats, targets)`, score on the rest."""
    split = int(0.75 * len(feats))
    mean, std = feats[:split].mean(0), feats[:split].std(0) + 1e-6
    x_train, x_test = (feats[:split] - mean) / std, (feats[split:] - mean) / std
    y_train, y_test = targets[:split], targets[split:]
    with torch.enable_grad():
        head = fit_logistic(x_train, y_train)
    with torch.no_grad():
        predicted = head(x_test) > 0
    majority = (y_train.mean(0) > 0.5).expand_as(y_test)
    return {
        "train_items": split,
        "test_items": len(feats) - split,
        "accuracy": float((predicted == y_test.bool()).float().mean()),
        "majority": float((majority == y_test.bool()).float().mean()),
    }


def linear_probes(
    model: MMDiT, data: str, modality: str, layer: int, items: int = 512, levels=(0.0,), seed: int = 0
) -> dict[str, dict]:
    """Held-out probe accuracy at each noise level in `levels`, keyed by `probe_key(t)` (on the first
    `items` items, or all of them when the modality has fewer; noise seeded by `seed`)."""
    for t in levels:
        if not 0 <= t < 1:
            raise ValueError(f"probe noise levels must be in [0, 1) (t = 1 is pure noise), got {t}")
    evalset = read_eval_set(data, modality, items, allow_fewer=True)
    targets = torch.from_numpy(np.stack([attribute_targets(modality, a) for a in evalset.attributes]))
    out = {}
    for t in levels:
        feats = probe_features(model.eval(), evalset.x0, evalset.ids, modality, layer, t, seed)
        out[probe_key(t)] = {"layer": layer, "t": t, "seed": seed, **score_probe(feats, targets)}
    return out


def linear_probe(
    model: MMDiT, data: str, modality: str, layer: int, items: int = 512, t: float = 0.0, seed: int = 0
) -> dict:
    """The probe at one noise level (`linear_probes` with `levels=[t]`)."""
    return linear_probes(model, data, modality, layer, items, [t], seed)[probe_key(t)]
