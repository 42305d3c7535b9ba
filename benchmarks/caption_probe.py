"""Does a trained MMDiT use one word of the built-in captions? A probe of its denoiser and samples.

For the first N built-in images (or videos) of a prepared dataset, the clean tokens are noised to
level t (fixed noise) and the model's one-step estimate `x0_hat = x_t - t * v` is computed twice:
conditioned on the true caption, and on the caption with one word swapped for another (image shape:
group 0's, the next of circle, square, triangle; image colour: group 0's, a palette colour no group
uses; video direction: the opposite one, left <-> right, up <-> down). Each estimate is decoded and
scored by the caption checker (`selfflow.eval.captions.score_image` / `score_video`) on that attribute
against the attributes its caption states, and the swapped estimate also against the true ones. A
model that uses the word moves `x0_hat` towards the swapped word at high t (accuracy against the true
attribute falls, against the swapped one rises); one that ignores it gives the same accuracy with
either caption. At low t the noisy item alone decides, so both captions score like the true item there.

    python benchmarks/caption_probe.py --checkpoint runs/demo/export/ema.safetensors --attribute shape
    python benchmarks/caption_probe.py --checkpoint runs/demo/export/ema.safetensors --attribute direction
"""

import argparse
import copy
import dataclasses

import numpy as np
import torch

from selfflow.backbone.checkpoint import load_export
from selfflow.data import synth_visual
from selfflow.data.loader import data_manifest
from selfflow.eval.captions import score_image, score_video
from selfflow.eval.generate import EvalSet, data_modality, decode, generate, read_eval_set
from selfflow.eval.media import to_uint8
from selfflow.flow.samplers import SamplerConfig
from selfflow.modalities.text import SentencePieceTokenizer, TextConfig

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
MODALITY = {"shape": "image", "color": "image", "direction": "video"}  # whose captions hold the word


def swapped(attrs: dict, attribute: str, rng: np.random.Generator) -> dict:
    """The item's attributes with group 0's shape or colour (an image's) or the direction (a video's)
    replaced, its caption rebuilt from them."""
    out = copy.deepcopy(attrs)
    if attribute == "direction":
        out["direction"] = OPPOSITE[out["direction"]]
        scene = synth_visual.VideoScene(**{f.name: out[f.name] for f in dataclasses.fields(synth_visual.VideoScene)})
        out["caption"] = synth_visual.video_caption(scene)
        return out
    group = out["groups"][0]
    if attribute == "shape":
        group["shape"] = synth_visual.SHAPES[(synth_visual.SHAPES.index(group["shape"]) + 1) % 3]
    else:
        unused = [c for c in synth_visual.PALETTE if c not in {g["color"] for g in out["groups"]}]
        group["color"] = unused[int(rng.integers(len(unused)))]
    for obj in out["objects"]:
        if obj["group"] == 0:
            obj.update(shape=group["shape"], color=group["color"], rgb=list(synth_visual.PALETTE[group["color"]]))
    groups = [synth_visual.Group(g["count"], g["shape"], g["color"], g["size"], g["region"]) for g in out["groups"]]
    scene = synth_visual.ImageScene(out["background"], out["background_rgb"], groups, out["relation"], [])
    out["caption"] = synth_visual.image_caption(scene)
    return out


def encode_captions(data: str, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions as the built-in data's sentencepiece ids (`configs/data/prepare_demo.yaml`)."""
    cfg = TextConfig(**data_manifest(data)["text"]["config"])
    if cfg.kind != "sentencepiece":
        raise ValueError(f"{data}: captions are {cfg.kind!r} here; the probe reads sentencepiece ids (the demo's)")
    tokens = SentencePieceTokenizer(cfg.path, cfg.max_length)(captions)
    return tokens.ids, tokens.mask


@torch.no_grad()
def estimates(model, items: EvalSet, noise, t: float, text, mask, modality) -> np.ndarray:
    """`x0_hat` at noise level t, decoded to uint8 images (N, H, W, 3) or videos (N, T, H, W, 3)."""
    out = []
    for s in range(0, len(items.keys), 64):
        x0 = items.x0[s : s + 64]
        x_t = (1 - t) * x0 + t * noise[s : s + 64]
        v = model(x_t, torch.full((x0.shape[0],), t), items.ids[s : s + 64], txt=text[s : s + 64],
                  txt_mask=mask[s : s + 64], modality=items.modality)  # fmt: skip
        out.append(x_t - t * v)
    return to_uint8(decode(modality, torch.cat(out), items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a `selfflow export` of an MMDiT run")
    parser.add_argument("--data", default="data/demo/latents", help="prepared built-in data (with its json)")
    parser.add_argument("--attribute", choices=tuple(MODALITY), default="shape", help="direction: videos")
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--t", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampled", action="store_true", help="also compare whole samples (Euler 25) per caption")
    args = parser.parse_args()

    model, _ = load_export(args.checkpoint)
    model.eval()
    name = MODALITY[args.attribute]
    items = read_eval_set(args.data, name, args.items)
    modality = data_modality(args.data, name)
    score = score_image if name == "image" else score_video
    rng = np.random.default_rng(args.seed)
    other = [swapped(a, args.attribute, rng) for a in items.attributes]
    true_text = (items.text, items.text_mask)
    swap_text = encode_captions(args.data, [a["caption"] for a in other])
    noise = torch.randn(items.x0.shape, generator=torch.Generator().manual_seed(args.seed))

    def accuracy(pixels, attrs) -> float:
        return float(np.mean([score(p, a)[args.attribute] for p, a in zip(pixels, attrs, strict=True)]))

    real = to_uint8(decode(modality, items.x0, items))
    print(f"{args.checkpoint}, {len(items.keys)} items of {args.data}, attribute {args.attribute}")
    print(f"real {name} items against their own attributes: {accuracy(real, items.attributes):.3f}")
    print("| t | true caption, vs true | swapped caption, vs swapped | swapped caption, vs true |")
    print("|---|---|---|---|")
    for t in args.t:
        with_true = estimates(model, items, noise, t, *true_text, modality)
        with_swap = estimates(model, items, noise, t, *swap_text, modality)
        print(f"| {t} | {accuracy(with_true, items.attributes):.3f} | {accuracy(with_swap, other):.3f} "
              f"| {accuracy(with_swap, items.attributes):.3f} |")  # fmt: skip
    if args.sampled:
        sampler = SamplerConfig(kind="euler", num_steps=25, cfg_scale=1.0)
        with_true = to_uint8(decode(modality, generate(model, items, sampler, args.seed), items))
        swap_items = items._replace(text=swap_text[0], text_mask=swap_text[1])
        with_swap = to_uint8(decode(modality, generate(model, swap_items, sampler, args.seed), swap_items))
        change = np.abs(with_true.astype(np.int16) - with_swap.astype(np.int16))
        change = change.reshape(len(change), -1).mean(axis=1)
        true_true, swap_swap = accuracy(with_true, items.attributes), accuracy(with_swap, other)
        swap_true, median = accuracy(with_swap, items.attributes), np.median(change)
        print(f"samples (Euler 25, seed {args.seed}): true caption, vs true {true_true:.3f}; swapped caption, "
              f"vs swapped {swap_swap:.3f}, vs true {swap_true:.3f}; mean |true - swapped| per pixel "
              f"{change.mean():.2f} (median item {median:.2f}, max {change.max():.2f}) of 255")  # fmt: skip


if __name__ == "__main__":
    main()
