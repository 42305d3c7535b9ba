"""Evaluation on the built-in dataset: the caption checker and the small feature networks.

The caption checker is validated without any model: freshly synthesised items must score near 100%,
the same media paired with another item's attributes near chance, and media re-rendered by the
generator with one attribute changed must fail exactly that check. The feature nets must train
bit-identically from a seed, give a Frechet distance of ~0 between a set and itself (however it is
batched), and one between real and corrupted sets (colours removed, noise) clearly above the one
between two independent real sets.
"""

import dataclasses
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.data import synth_audio, synth_visual
from selfflow.data.raw import read_shard
from selfflow.data.synth import SynthConfig, synth
from selfflow.eval.builtin_features import (
    FeatureNetConfig,
    as_inputs,
    attribute_names,
    attribute_targets,
    load_feature_net,
    train_feature_net,
)
from selfflow.eval.captions import caption_accuracy, read_items, score_audio, score_image, score_video
from selfflow.eval.metrics import FeatureStats

COUNTS = {"image": 40, "video": 32, "audio": 32}
STEPS = 80  # feature-net steps in these tests (the default is 300)


@pytest.fixture(scope="module")
def items(tmp_path_factory) -> dict[str, list]:
    """Freshly synthesised items per modality, read back from their shards."""
    out = tmp_path_factory.mktemp("synth") / "raw"
    cfg = SynthConfig(
        out_dir=str(out), num_images=COUNTS["image"], num_videos=COUNTS["video"], num_audio=COUNTS["audio"]
    )
    synth(cfg)
    return {"root": str(out), **{m: read_items(out / m, m) for m in COUNTS}}


@pytest.fixture(scope="module")
def captions(items) -> dict[str, list[str]]:
    """The stored caption (`txt`) of every item, in shard order."""
    root = Path(items["root"])
    return {
        m: [s["txt"].decode() for shard in sorted((root / m).glob("shard-*.tar")) for s in read_shard(shard)]
        for m in COUNTS
    }


def shuffled(pairs: list) -> list:
    """Each item's media with the next item's attributes."""
    return [(media, other) for (media, _), (_, other) in zip(pairs, pairs[1:] + pairs[:1], strict=True)]


# ---------------------------------------------------------------- caption checker


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_caption_checker_real_vs_shuffled(items, modality):
    real = caption_accuracy(modality, items[modality])
    fake = caption_accuracy(modality, shuffled(items[modality]))
    expected = {
        "image": {"background", "color", "shape", "size", "count", "layout"},
        "video": {"background", "color", "shape", "size", "direction", "speed"},
        "audio": {"pitch", "onsets", "timbre", "tempo"},
    }[modality]
    assert set(real["per_attribute"]) == expected and real["count"] == COUNTS[modality]
    for name, acc in real["per_attribute"].items():
        assert acc >= 0.95, (modality, name, real)
    assert real["overall"] >= 0.98
    assert fake["overall"] <= 0.35, fake
    for name, acc in fake["per_attribute"].items():  # chance: 1/3 for the background, ~1/2 for onsets
        assert acc <= 0.6, (name, fake)
    assert real["checked"]["pitch" if modality == "audio" else "color"] == COUNTS[modality]


def test_image_checks_follow_each_attribute():
    """Scenes re-rendered with one attribute changed fail that check and keep the others."""
    cfg = SynthConfig(out_dir="unused")
    size = cfg.image_size
    other_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}
    for i in range(12):
        scene = synth_visual.sample_image_scene(np.random.default_rng(1000 + i), size)
        attrs = {**_asdict(scene), "image_size": size}
        assert all(score_image(synth_visual.render_image(scene, size), attrs).values())
        swapped = [(other_shape[o.shape], o.rgb, o.center, o.radius) for o in scene.objects]
        scores = score_image(synth_visual.render(scene.background_rgb, swapped, size), attrs)
        assert not scores["shape"] and scores["color"] and scores["layout"] and scores["background"], scores
        recoloured = [(o.shape, synth_visual.PALETTE[_other_color(scene)], o.center, o.radius) for o in scene.objects]
        scores = score_image(synth_visual.render(scene.background_rgb, recoloured, size), attrs)
        assert not scores["color"] and scores["background"], scores
        flip = _flip_against_layout(scene)
        if flip is not None:  # mirrored across the stated layout: only the layout is wrong
            scores = score_image(np.ascontiguousarray(flip(synth_visual.render_image(scene, size))), attrs)
            assert not scores["layout"] and scores["color"] and scores["count"], (
                scores
            )  # (a flipped triangle points down)
        fewer = [(o.shape, o.rgb, o.center, o.radius) for o in scene.objects[:-1]]  # the last object left out
        scores = score_image(synth_visual.render(scene.background_rgb, fewer, size), attrs)
        assert not scores["count"] and scores["background"], scores


def test_video_played_backwards_moves_the_other_way():
    cfg = SynthConfig(out_dir="unused")
    for i in range(6):
        scene = synth_visual.sample_video_scene(np.random.default_rng(2000 + i), cfg.video_size, cfg.video_frames)
        frames = synth_visual.render_video(scene, cfg.video_size)
        attrs = {**_asdict(scene), "video_size": cfg.video_size}
        assert all(score_video(frames, attrs).values())
        scores = score_video(np.ascontiguousarray(frames[::-1]), attrs)
        assert not scores["direction"] and scores["color"], scores
        assert scores["shape"] and scores["size"] and scores["speed"], scores  # the object itself is unchanged


def test_audio_checks_follow_each_attribute():
    """A clip re-rendered two semitones up fails pitch but keeps its onsets and tempo; with another timbre it
    fails timbre but keeps its pitch."""
    sr = 16000
    for i in range(8):
        clip = synth_audio.sample_audio_clip(np.random.default_rng(3000 + i), 1.0)
        attrs = _asdict(clip)
        wave = synth_audio.render_audio(clip, sr, 1)[:, 0] / 32767
        assert all(score_audio(wave, sr, attrs).values()), (attrs["template"], score_audio(wave, sr, attrs))
        up = [synth_audio.make_note(n.midi + 2, n.onset, n.duration) for n in clip.notes]
        scores = score_audio(synth_audio.render_audio(replace(clip, notes=up), sr, 1)[:, 0] / 32767, sr, attrs)
        assert not scores["pitch"] and scores["onsets"] and scores.get("tempo", True), scores
        timbre = "plucked" if clip.timbre != "plucked" else "organ"
        other = synth_audio.render_audio(replace(clip, timbre=timbre), sr, 2).T / 32767  # (C, S)
        scores = score_audio(other, sr, attrs)
        assert not scores["timbre"] and scores["pitch"], (clip.timbre, scores)


def test_caption_accuracy_rejects_bad_input(items):
    with pytest.raises(ValueError, match="modality"):
        caption_accuracy("text", items["image"])
    with pytest.raises(ValueError, match="no image items"):
        caption_accuracy("image", [])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        score_image(items["image"][0][0].astype(np.float32), items["image"][0][1])


def _asdict(obj) -> dict:
    """A scene or clip as its synth `json` holds it (dataclasses through json, as `synth.make_sample` writes)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _flip_against_layout(scene):
    """The mirror that breaks the scene's stated region or relation (None for the centre region)."""
    where = scene.groups[0].region if scene.relation is None else scene.relation
    if where in ("left", "right", "left of", "right of"):
        return lambda pixels: pixels[:, ::-1]
    if where in ("top", "bottom", "above", "below"):
        return lambda pixels: pixels[::-1]
    return None


def _other_color(scene) -> str:
    return next(c for c in synth_visual.PALETTE if c not in {g.color for g in scene.groups})


# ---------------------------------------------------------------- feature nets


def test_targets_match_the_captions(captions, items):
    """The multi-label targets agree with the stored caption text, read with regexes here."""
    for modality in ("image", "video"):
        for caption, (_, attrs) in zip(captions[modality], items[modality], strict=True):
            targets = dict(zip(attribute_names(modality), attribute_targets(modality, attrs), strict=True))
            for name, on in targets.items():
                group, value = name.split(":")
                if group in ("background", "color", "shape", "size", "direction"):
                    assert bool(re.search(rf"\b{value}", caption)) == bool(on), (caption, name)
    for caption, (_, attrs) in zip(captions["audio"], items["audio"], strict=True):
        targets = dict(zip(attribute_names("audio"), attribute_targets("audio", attrs), strict=True))
        notes = re.findall(r"\b([A-G]#?)(\d)\b", caption)
        assert {k for k, v in targets.items() if v and k.startswith("pitch:")} == {f"pitch:{p}" for p, _ in notes}
        assert {k for k, v in targets.items() if v and k.startswith("octave:")} == {f"octave:{o}" for _, o in notes}
        timbres = [k for k, v in targets.items() if v and k.startswith("timbre:")]
        assert len(timbres) == 1 and synth_audio.TIMBRE_WORDS[timbres[0][7:]] in caption.split(), caption


@pytest.fixture(scope="module")
def nets(items, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("features")
    return {m: load_feature_net(train_feature_net(m, items[m], out / f"{m}.safetensors", steps=STEPS)) for m in COUNTS}


def test_training_is_deterministic(items, tmp_path):
    a = train_feature_net("image", items["image"], tmp_path / "a.safetensors", steps=20, seed=3)
    b = train_feature_net("image", items["image"], tmp_path / "b.safetensors", steps=20, seed=3)
    c = train_feature_net("image", items["image"], tmp_path / "c.safetensors", steps=20, seed=4)
    sha = [json.loads(p.with_suffix(".json").read_text())["sha256"] for p in (a, b, c)]
    assert sha[0] == sha[1] != sha[2]
    assert a.read_bytes() == b.read_bytes()
    assert load_feature_net(a).sha256 == sha[0]


def batch(modality: str, pairs: list) -> torch.Tensor:
    return torch.stack([as_inputs(modality, media) for media, _ in pairs])


def corrupt(modality: str, x: torch.Tensor) -> torch.Tensor:
    """Pictures with their colours removed (each pixel's channel mean); audio under white noise at -20 dBFS."""
    if modality == "audio":
        return x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return x.mean(dim=1, keepdim=True).expand_as(x).clone()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Other items (seed 1), enough for stable statistics: 200 images, 100 videos, 100 clips."""
    out = tmp_path_factory.mktemp("fresh")
    synth(SynthConfig(out_dir=str(out), seed=1, num_images=200, num_videos=100, num_audio=100))
    return {m: batch(m, read_items(out / m, m)) for m in COUNTS}


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_frechet_distance_real_vs_corrupted(nets, fresh, modality):
    net, x = nets[modality], fresh[modality]

    def stats(*chunks: torch.Tensor) -> FeatureStats:
        s = FeatureStats(net.cfg.feature_dim)
        for chunk in chunks:
            s.update(net.features(chunk))
        return s

    half = len(x) // 2
    same = stats(x).frechet_distance(stats(*x.split(7)))  # other batches: features do not depend on them
    real = stats(x[:half]).frechet_distance(stats(x[half:]))  # two independent real sets
    corrupted = stats(x[:half]).frechet_distance(stats(corrupt(modality, x[half:])))
    assert abs(same) < 1e-6 * real, (same, real)
    assert corrupted > 2 * real, (corrupted, real)


def test_feature_net_learns_the_attributes(nets, items):
    """On its training items the head beats always answering the majority value, label by label."""
    for modality, net in nets.items():
        x = batch(modality, items[modality])
        y = torch.from_numpy(np.stack([attribute_targets(modality, a) for _, a in items[modality]]))
        with torch.no_grad():
            hit = ((net.attribute_logits(x) > 0) == (y > 0.5)).float().mean(0)
        majority = torch.maximum(y.mean(0), 1 - y.mean(0))
        assert hit.mean() > majority.mean() + 0.1, (modality, hit.mean(), majority.mean())
        assert net.features(x).shape == (len(x), net.cfg.feature_dim)


def test_wrong_inputs_and_missing_files(nets, tmp_path):
    with pytest.raises(ValueError, match=r"expected a batch \(N, 3, 32, 32\)"):
        nets["image"].features(torch.zeros(2, 3, 16, 16))
    missing = tmp_path / "nowhere" / "image.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_feature_net(missing)
    with pytest.raises(ValueError, match="modality"):
        train_feature_net("image", [], tmp_path / "x.safetensors", cfg=FeatureNetConfig(modality="audio"))


def test_tampered_weights_are_refused(items, tmp_path):
    path = train_feature_net("video", items["video"], tmp_path / "v.safetensors", steps=2)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_feature_net(path)
