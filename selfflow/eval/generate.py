"""Caption-conditioned generation with a trained MMDiT, for evaluation: read items, sample, decode.

An evaluation set is the first N items of a modality's prepared latent shards (`selfflow prepare`),
in shard order: their captions (text ids) condition the samples, their latents decoded by the
modality's autoencoder are the real reference, and their stored attributes say what the caption
asked for. Sample i draws all of its noise from a generator seeded by `(seed, i)`
(`selfflow.eval.sample.sample_seed`), so a sample does not depend on batch size or process count.

Classifier-free guidance (a sampler with cfg_scale != 1; evaluation's reported set has none, its
guided set does) reuses the samplers' doubled batch: the "label" of a row is its index in a table of
text conditions whose last row is the null condition (every text token masked out, as training's
condition dropout does).

    items = read_eval_set("data/synth/latents", "image", 64)
    tokens = generate(model, items, SamplerConfig(kind="euler", num_steps=50), seed=0)
    media = decode(modality, tokens, items)  # (N, 3, H, W) in [-1, 1]
"""

import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from selfflow.backbone.mmdit import MMDiT
from selfflow.data.batch import stack_text
from selfflow.data.loader import data_manifest, decode_sample, modality_shards
from selfflow.data.raw import read_shard
from selfflow.eval.sample import sample_seed
from selfflow.flow.samplers import PerSampleNoise, SamplerConfig, sample
from selfflow.modalities.base import Modality
from selfflow.modalities.builder import ModalityConfig, build_modality


class EvalSet(NamedTuple):
    modality: str
    x0: Tensor  # (N, L, C) clean latent tokens, float32
    ids: Tensor  # (N, L, 4) position ids
    text: Tensor | None  # (N, L_txt) ids or (N, L_txt, D) features
    text_mask: Tensor | None  # (N, L_txt) bool
    latent_shape: tuple[int, ...]  # one item's latent grid shape
    captions: list[str]
    attributes: list[dict]  # each item's stored json (the synth attributes, caption, latent_shape)
    keys: list[str]


def read_eval_set(data_dir: str | Path, modality: str, count: int, allow_fewer: bool = False) -> EvalSet:
    """The first `count` items of `data_dir/<modality>/*.tar` (all with the first item's token shape);
    with `allow_fewer`, all of them when there are fewer."""
    samples, metas = [], []
    for shard in modality_shards(str(data_dir), modality):
        for raw in read_shard(shard, {"latent.pth", "text.pth", "json", "txt"}):
            meta = json.loads(raw["json"]) if "json" in raw else {}
            decoded = decode_sample(raw)
            if samples and decoded["latent"]["tokens"].shape != samples[0]["latent"]["tokens"].shape:
                continue  # one token shape per evaluation set: samplers draw one noise shape
            samples.append(decoded)
            metas.append(meta)
            if len(samples) == count:
                break
        if len(samples) == count:
            break
    if len(samples) < count and not (allow_fewer and samples):
        raise ValueError(f"{data_dir}/{modality}: asked for {count} evaluation items, found {len(samples)}")
    if "latent_shape" not in metas[0]:
        raise ValueError(f"{data_dir}/{modality}: item {samples[0]['key']} has no latent_shape in its json")
    text, mask = stack_text(samples)
    return EvalSet(
        modality,
        torch.stack([s["latent"]["tokens"] for s in samples]).float(),
        torch.stack([s["latent"]["ids"] for s in samples]).long(),
        text,
        mask,
        tuple(metas[0]["latent_shape"]),
        [m.get("caption", "") for m in metas],
        metas,
        [s["key"] for s in samples],
    )


def data_modality(data_dir: str | Path, name: str) -> Modality:
    """The modality adapter that `selfflow prepare` used for `data_dir` (from its manifest.json)."""
    entry = data_manifest(str(data_dir)).get("modalities", {}).get(name)
    if entry is None or "modality" not in entry:
        raise ValueError(f"{data_dir}/manifest.json records no modality {name!r}")
    return build_modality(ModalityConfig(**entry["modality"]))


@torch.no_grad()
def generate(
    model: MMDiT, items: EvalSet, sampler: SamplerConfig, seed: int, batch_size: int = 32, indices=None
) -> Tensor:
    """Samples `(n, L, C)` for `indices` (default all items) conditioned on their captions."""
    device = next(model.parameters()).device
    indices = list(range(len(items.keys))) if indices is None else list(indices)
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        noise_source = PerSampleNoise([sample_seed(seed, i) for i in chunk])
        shape = items.x0.shape[1:]
        noise = torch.stack([torch.randn(*shape, generator=g) for g in noise_source.generators]).to(device)
        ids = items.ids[chunk[:1]].to(device)
        txt = mask = None
        if items.text is not None and model.cfg.context_dim:
            txt = torch.cat((items.text[chunk], items.text[chunk[:1]])).to(device)  # last row: null condition
            mask = torch.cat((items.text_mask[chunk], torch.zeros_like(items.text_mask[chunk[:1]]))).to(device)
        rows = torch.arange(len(chunk), device=device)

        def velocity(x, t, row, ids=ids, txt=txt, mask=mask):
            cond = {} if txt is None else {"txt": txt[row], "txt_mask": mask[row]}
            return model(x, t, ids.expand(x.shape[0], -1, -1), modality=items.modality, **cond)

        out.append(sample(velocity, noise, rows, sampler, null_label=len(chunk), noise_source=noise_source).cpu())
    return torch.cat(out)


def decode(modality: Modality, tokens: Tensor, items: EvalSet) -> Tensor:
    """Tokens `(N, L, C)` of `items`' shape -> media in [-1, 1]: image `(N, 3, H, W)`, video
    `(N, 3, T, H, W)`, audio `(N, C, S)`."""
    n = tokens.shape[0]
    latent = modality.scatter(tokens, items.ids[:n], (n, *items.latent_shape))
    return modality.decode(latent).float().clamp(-1, 1)
