"""Linear probe: how well a trunk's block-`l` features of clean media predict the built-in attributes.

For the first `items` items of a modality's prepared data, the trunk sees the clean latent tokens
(t = 0, or a chosen noise level with seeded noise) with no caption, so the features can only know
what the media shows; the data tokens' hidden state after block `layer` is mean-pooled to one
vector per item. A multi-label logistic regression (full-batch, standardised features, fixed
seed) is fitted on the first 75% and scored on the last 25% against the attributes' 0/1 targets
of `builtin_features.attribute_targets`. Reported: mean per-label accuracy, and what always
guessing each label's majority answer from the training split scores on the same test split.

    linear_probe(model, "data/demo/latents", "image", layer=2)  # {"accuracy": 0.9, "majority": 0.76, ...}
"""

import numpy as np
import torch
import torch.nn.functional as F

from selfflow.backbone.mmdit import MMDiT
from selfflow.eval.builtin_features import attribute_targets
from selfflow.eval.generate import read_eval_set
from selfflow.flow.paths import interpolate


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


def linear_probe(
    model: MMDiT, data: str, modality: str, layer: int, items: int = 512, t: float = 0.0, seed: int = 0
) -> dict:
    """Held-out mean per-label accuracy of a linear probe on block-`layer` features (on the first
    `items` items, or all of them when the modality has fewer)."""
    evalset = read_eval_set(data, modality, items, allow_fewer=True)
    targets = torch.from_numpy(np.stack([attribute_targets(modality, a) for a in evalset.attributes]))
    feats = probe_features(model.eval(), evalset.x0, evalset.ids, modality, layer, t, seed)
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
        "layer": layer,
        "t": t,
        "train_items": split,
        "test_items": len(feats) - split,
        "accuracy": float((predicted == y_test.bool()).float().mean()),
        "majority": float((majority == y_test.bool()).float().mean()),
    }
