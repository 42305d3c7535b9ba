"""The built-in dataset generator: shards and manifest, captions checked against pixels and samples, determinism.

The checks read captions with their own regexes and measure the media with plain numpy (pixel
moments, FFT peaks, an amplitude envelope), so a caption that lies about its item fails here.
"""

import hashlib
import io
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from selfflow.config import ConfigError, load_config
from selfflow.data import synth_visual
from selfflow.data.raw import decode_video
from selfflow.data.synth import SynthConfig, make_sample, synth
from selfflow.eval.media import to_uint8

SMALL = dict(num_images=20, num_videos=6, num_audio=8, samples_per_shard=8)
MEDIA = {"image": "png", "video": "mp4", "audio": "flac"}
COLORS = "red|green|blue|yellow|purple|cyan|orange"
GROUP = rf"(a|two|three) (small|large) ({COLORS}) (circle|square|triangle)s?"
AT_REGION = re.compile(
    rf"^{GROUP} (on the left|on the right|at the top|at the bottom|in the center), (\w+) background$"
)
RELATION = re.compile(rf"^{GROUP} (left of|right of|above|below) {GROUP}, (\w+) background$")
MOTION = re.compile(
    rf"^a (small|large) ({COLORS}) (circle|square|triangle) moving (left|right|up|down) (slowly|quickly),"
    r" (\w+) background$"
)
COUNTS = {"a": 1, "two": 2, "three": 3}
LUMA = np.array([0.299, 0.587, 0.114])  # BT.601, as in yuv420p
NOTE_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "raw"
    return out, synth(SynthConfig(out_dir=str(out), **SMALL))


def read_samples(out: Path, modality: str) -> list[dict]:
    urls = sorted(str(p) for p in (out / modality).glob("shard-*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False))


# ---------------------------------------------------------------- image measurements


def coverage(pixels: np.ndarray, bg, rgb) -> np.ndarray:
    """Per-pixel fraction of `rgb` blended over `bg`; 0 where the pixel is not on that blend line."""
    px, bg, d = pixels.astype(float), np.asarray(bg, float), np.asarray(rgb, float) - np.asarray(bg, float)
    a = np.clip((px - bg) @ d / (d @ d), 0.0, 1.0)
    off_line = np.linalg.norm(px - bg - a[..., None] * d, axis=-1) > 30
    return np.where(off_line, 0.0, a)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks."""
    seen, out = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        comp, stack = np.zeros_like(mask), [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(comp)
    return out


def dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1]
    out[:, :-1] |= out[:, 1:]
    return out


def measure_objects(pixels: np.ndarray, bg, rgb) -> list[dict]:
    """Each blob of colour `rgb`: centre, area, and a shape guess from its moments."""
    a = coverage(pixels, bg, rgb)
    yy, xx = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]] + 0.5
    blobs = []
    for comp in components(a > 0.5):
        if comp.sum() < 4:
            continue
        w = a * dilate(comp)  # the anti-aliased rim belongs to the blob too
        area = w.sum()
        cx, cy = (w * xx).sum() / area, (w * yy).sum() / area
        x, y = xx - cx, yy - cy
        skew = (w * y**3).sum() / area / ((w * y * y).sum() / area) ** 1.5  # a triangle pointing up: < 0
        square_ness = (w * x * x * y * y).sum() / (0.5 * (w * (x**4 + y**4)).sum())  # disc 1/3, square 5/9
        shape = "triangle" if skew < -0.3 else "square" if square_ness > 0.44 else "circle"
        blobs.append({"center": (cx, cy), "area": area, "shape": shape})
    return blobs


def size_name(shape: str, area: float, side: int) -> str:
    """Invert the shape's area formula for its radius, then take the nearer of the two sizes."""
    per_r2 = {"circle": np.pi, "square": 1.6**2, "triangle": 3 * np.sqrt(3) / 4 * 1.15**2}[shape]
    r = np.sqrt(area / per_r2) / side
    return min(synth_visual.SIZES, key=lambda s: abs(synth_visual.SIZES[s] - r))


def in_region(center, region: str, side: int) -> bool:
    x, y = center[0] / side, center[1] / side
    return {"left": x < 0.5, "right": x > 0.5, "top": y < 0.5, "bottom": y > 0.5}.get(
        region, abs(x - 0.5) < 0.15 and abs(y - 0.5) < 0.15
    )


def check_image(png: bytes, caption: str, attrs: dict) -> None:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    side = pixels.shape[0]
    assert pixels.shape == (attrs["image_size"], side, 3)
    if m := AT_REGION.match(caption):
        groups, where, bg = [m.groups()[:4]], m.group(5), m.group(6)
        relation = None
    else:
        m = RELATION.match(caption)
        assert m, caption
        groups, relation, bg = [m.groups()[:4], m.groups()[5:9]], m.group(5), m.group(10)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_rgb = Counter(map(tuple, border)).most_common(1)[0][0]
    assert bg_rgb == tuple(synth_visual.BACKGROUNDS[bg]) and attrs["background"] == bg, caption
    found = []
    for (count, size, color, shape), g in zip(groups, attrs["groups"], strict=True):
        assert (COUNTS[count], size, color, shape) == (g["count"], g["size"], g["color"], g["shape"]), caption
        blobs = measure_objects(pixels, bg_rgb, synth_visual.PALETTE[color])
        assert len(blobs) == COUNTS[count], caption
        for b in blobs:
            assert b["shape"] == shape and size_name(shape, b["area"], side) == size, (caption, b)
        found.append([b["center"] for b in blobs])
    if relation is None:
        assert all(in_region(c, where.split()[-1], side) for c in found[0]), caption
    else:
        axis, sign = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}[relation]
        assert all(sign * (a[axis] - b[axis]) < 0 for a in found[0] for b in found[1]), caption
    # the stored centres are where the pixels are
    measured = np.array([c for cs in found for c in cs])
    for o in attrs["objects"]:
        assert np.linalg.norm(measured - o["center"], axis=1).min() < 0.3, (caption, o)


# ---------------------------------------------------------------- video measurements


def check_video(mp4: bytes, caption: str, attrs: dict) -> None:
    m = MOTION.match(caption)
    assert m, caption
    size, color, shape, direction, adverb, bg = m.groups()
    for key, value in dict(size=size, color=color, shape=shape, direction=direction, background=bg).items():
        assert attrs[key] == value, caption
    assert attrs["speed"] == {"slowly": "slow", "quickly": "fast"}[adverb]
    video = to_uint8(decode_video(mp4)[None])[0]  # (T, H, W, 3): the project's decoder (PyAV)
    side = attrs["video_size"]
    assert video.shape == (attrs["frames"], side, side, 3)
    rgb, bg_rgb = np.array(synth_visual.PALETTE[color]), np.array(synth_visual.BACKGROUNDS[bg])
    # lossy yuv420p: colours within a tolerance
    assert np.abs(np.median(video[:, [0, -1]].reshape(-1, 3), axis=0) - bg_rgb).max() <= 8, caption
    inside = np.linalg.norm(video.astype(float) - rgb, axis=-1) < 60
    assert inside.sum(axis=(1, 2)).min() >= 10, caption
    seen = np.median(video[inside], axis=0)  # small objects lose some colour to 2x2 chroma blocks
    palette = synth_visual.PALETTE
    assert min(palette, key=lambda c: np.linalg.norm(seen - palette[c])) == color, (caption, seen)
    assert np.abs(seen - rgb).max() <= 40, (caption, seen)
    centres = np.array([object_centre(frame, bg_rgb, rgb) for frame in video])
    # chroma is subsampled 2x2, so the centre is exact only from luma; some colours barely differ in luma
    atol = 0.5 if abs((rgb - bg_rgb) @ LUMA) >= 40 else 1.0
    np.testing.assert_allclose(centres, attrs["centers"], atol=atol)
    axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[direction]
    t = np.arange(len(video))
    travel = np.polyfit(t, centres[:, axis], 1)[0] * (len(video) - 1) * sign  # straight-line fit
    assert abs(travel - {"slowly": 0.2, "quickly": 0.4}[adverb] * side) < 1.0, (caption, travel)
    assert np.ptp(centres[:, 1 - axis]) < 2 * atol, caption  # and only that way


def object_centre(frame: np.ndarray, bg_rgb: np.ndarray, rgb: np.ndarray) -> tuple[float, float]:
    """Centre of the one object in a decoded frame, weighted by its coverage (from luma where it can be)."""
    yy, xx = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]] + 0.5
    near = dilate(np.linalg.norm(frame.astype(float) - rgb, axis=-1) < 60)
    dl = (rgb - bg_rgb) @ LUMA
    if abs(dl) >= 40:
        w = np.clip((frame.astype(float) - bg_rgb) @ LUMA / dl, 0.0, 1.0) * near
    else:
        w = coverage(frame, bg_rgb, rgb) * near
    return (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()


# ---------------------------------------------------------------- audio measurements


def note_hz(name: str) -> float:
    pitch, octave = name[:-1], int(name[-1])
    return 440.0 * 2 ** ((NOTE_NAMES.index(pitch) + 12 * (octave + 1) - 69) / 12)


def spectrum(x: np.ndarray, sr: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    return np.fft.rfftfreq(n, 1 / sr), mag


def peak_hz(x: np.ndarray, sr: int) -> float:
    freqs, mag = spectrum(x, sr, max(len(x), sr))  # zero-padded to 1 Hz bins at least
    return float(freqs[np.argmax(mag)])


def onsets_from_envelope(x: np.ndarray, sr: int) -> list[float]:
    """Times where a 12 ms moving-max envelope rises through 10% of its peak."""
    win, hop = int(0.012 * sr), sr // 1000
    env = np.array([np.abs(x[i : i + win]).max() for i in range(0, len(x) - win, hop)])
    above = env > 0.1 * env.max()
    rises = np.nonzero(above[1:] & ~above[:-1])[0] + 1
    return ([0.0] if above[0] else []) + [(r * hop + win) / sr for r in rises]  # the window's new sample


def check_timbre(x: np.ndarray, sr: int, hz: float, timbre: str) -> None:
    freqs, mag = spectrum(x, sr, len(x))
    harm = [mag[np.abs(freqs - k * hz) <= 3].max() if k * hz < 0.45 * sr else 0.0 for k in (1, 2, 3)]
    h2, h3 = harm[1] / harm[0], harm[2] / harm[0]
    quarter = len(x) // 4
    decay = np.sqrt(np.mean(x[-quarter:] ** 2) / np.mean(x[:quarter] ** 2))
    if timbre == "plucked":
        assert decay < 0.75
    else:
        assert decay > 0.9
        bands = {"sine": (0, 0.02, 0, 0.02), "square": (0, 0.02, 0.2, 0.45), "organ": (0.45, 0.75, 0.3, 0.5)}
        lo2, hi2, lo3, hi3 = bands[timbre]
        assert lo2 <= h2 <= hi2 and (lo3 <= h3 <= hi3 or 3 * hz >= 0.45 * sr), (timbre, h2, h3)


def check_audio(flac: bytes, caption: str, attrs: dict) -> None:
    pcm, sr = sf.read(io.BytesIO(flac), always_2d=True)
    assert sr == attrs["sample_rate"] and pcm.shape == (round(attrs["seconds"] * sr), attrs["channels"])
    x = pcm[:, 0]
    notes = attrs["notes"]
    for n in notes:
        assert abs(n["hz"] - note_hz(n["name"])) < 0.01
    if m := re.match(r"^an? single ([\w-]+) ([A-G]#?\d) note \((\d+) Hz\)$", caption):
        timbre, name, hz = m.groups()
        assert [n["name"] for n in notes] == [name] and abs(int(hz) - note_hz(name)) <= 0.5
        assert abs(peak_hz(x, sr) - note_hz(name)) <= 1.0, caption  # one 1 Hz bin
        check_timbre(x, sr, note_hz(name), attrs["timbre"])
    elif m := re.match(r"^an? ([\w-]+) ([A-G]#?) (major|minor) chord \(([^)]*)\)$", caption):
        timbre, root, quality, names = m.groups()
        names = names.split()
        assert [n["name"] for n in notes] == names and attrs["chord"] == f"{root} {quality}"
        steps = [round(12 * np.log2(note_hz(n) / note_hz(names[0]))) for n in names]
        assert names[0][:-1] == root and steps == {"major": [0, 4, 7], "minor": [0, 3, 7]}[quality]
        freqs, mag = spectrum(x, sr, len(x))
        for name in names:  # every chord tone stands out in the spectrum
            assert mag[np.abs(freqs - note_hz(name)) <= 2].max() > 0.2 * mag.max(), (caption, name)
    else:
        melody = re.match(r"^an? (slow|fast) ([\w-]+) melody of ([A-G#\d ]+) at (\d+) bpm$", caption)
        rhythm = re.match(r"^an? ([\w-]+) ([A-G]#?\d) note repeated (slowly|quickly) at (\d+) bpm$", caption)
        assert melody or rhythm, caption
        bpm = int((melody or rhythm).group(4))
        names = melody.group(3).split() if melody else [rhythm.group(2)] * len(notes)
        timbre = (melody or rhythm).group(2 if melody else 1)
        assert [n["name"] for n in notes] == names and attrs["tempo_bpm"] == bpm
        beat = 60 / bpm
        found = onsets_from_envelope(x, sr)
        np.testing.assert_allclose(found, [k * beat for k in range(len(names))], atol=0.02)
        for n, name in zip(notes, names, strict=True):  # the pitch of each note, from its own segment
            start, stop = int((n["onset"] + 0.005) * sr), int((n["onset"] + n["duration"]) * sr)
            assert abs(peak_hz(x[start:stop], sr) - note_hz(name)) < 0.03 * note_hz(name), (caption, name)
    assert {"sine", "square-wave", "organ", "plucked"} >= {timbre}
    assert timbre.replace("square-wave", "square") == attrs["timbre"]


# ---------------------------------------------------------------- tests


def test_shards_and_manifest(small_run):
    out, manifest = small_run
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["config"]["num_images"] == 20 and manifest["video_codec"] in ("libx264", "mpeg4")
    for modality, count in [("image", 20), ("video", 6), ("audio", 8)]:
        entry = manifest["modalities"][modality]
        assert entry["count"] == count
        assert [s["samples"] for s in entry["shards"]] == [min(8, count - k) for k in range(0, count, 8)]
        for s in entry["shards"]:
            assert (out / s["path"]).stat().st_size == s["bytes"]
        samples = read_samples(out, modality)
        assert [s["__key__"] for s in samples] == [f"{modality}-{i:06d}" for i in range(count)]
        for s in samples:
            assert {MEDIA[modality], "txt", "json"} <= set(s)
            attrs = json.loads(s["json"])
            assert attrs["modality"] == modality and attrs["seed"] == 0
            assert s["__key__"] == f"{modality}-{attrs['index']:06d}"


def test_image_captions_match_pixels(small_run):
    out, _ = small_run
    for s in read_samples(out, "image"):
        check_image(s["png"], s["txt"].decode(), json.loads(s["json"]))
    cfg = SynthConfig(out_dir="unused", image_size=48)  # more scenes, at another size
    templates = Counter()
    for i in range(40):
        s = make_sample(cfg, "image", i, "libx264")
        attrs = json.loads(s["json"])
        check_image(s["png"], s["txt"].decode(), attrs)
        templates[attrs["relation"] is None] += 1
    assert len(templates) == 2  # both caption templates were checked


def test_video_decodes_and_moves_as_captioned(small_run):
    out, _ = small_run
    for s in read_samples(out, "video"):
        check_video(s["mp4"], s["txt"].decode(), json.loads(s["json"]))
    cfg = SynthConfig(out_dir="unused")
    for i in range(6, 30):
        s = make_sample(cfg, "video", i, synth_visual.pick_video_codec())
        check_video(s["mp4"], s["txt"].decode(), json.loads(s["json"]))
    for i in range(4):  # the fallback codec, for PyAV builds without libx264
        s = make_sample(cfg, "video", i, "mpeg4")
        check_video(s["mp4"], s["txt"].decode(), json.loads(s["json"]))


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_decoded_video_is_the_written_frames_in_order(codec):
    """Every written frame comes back, in order: frame t decodes closest to rendered frame t (lossy codec)."""
    if codec == "libx264" and synth_visual.pick_video_codec() != "libx264":
        codec = "mpeg4"  # a PyAV build without libx264 writes mpeg4 (tested either way)
    cfg = SynthConfig(out_dir="unused")
    for i in range(4):
        scene = synth_visual.sample_video_scene(np.random.default_rng(3000 + i), cfg.video_size, cfg.video_frames)
        written = synth_visual.render_video(scene, cfg.video_size)
        decoded = to_uint8(decode_video(synth_visual.encode_mp4(written, cfg.fps, codec))[None])[0]
        assert decoded.shape == written.shape
        error = np.abs(decoded.astype(float)[:, None] - written.astype(float)[None]).mean(axis=(2, 3, 4))  # (T, T)
        assert (error.argmin(axis=1) == np.arange(len(written))).all(), error
        assert error.diagonal().max() < 4.0, error.diagonal()  # levels of 255, yuv420p chroma included


def test_audio_captions_match_samples(small_run):
    out, _ = small_run
    for s in read_samples(out, "audio"):
        check_audio(s["flac"], s["txt"].decode(), json.loads(s["json"]))
    cfg = SynthConfig(out_dir="unused")
    templates = Counter()
    for i in range(8, 80):
        s = make_sample(cfg, "audio", i, "libx264")
        attrs = json.loads(s["json"])
        check_audio(s["flac"], s["txt"].decode(), attrs)
        templates[(attrs["template"], attrs["timbre"])] += 1
    assert len(templates) == 16  # every template with every timbre


def test_stereo_wav_48k(tmp_path):
    cfg = SynthConfig(out_dir=str(tmp_path), audio_channels=2, sample_rate=48000, audio_format="wav")
    s = make_sample(cfg, "audio", 3, "libx264")
    pcm, sr = sf.read(io.BytesIO(s["wav"]), always_2d=True, dtype="int16")
    assert sr == 48000 and pcm.shape == (48000, 2) and (pcm[:, 0] == pcm[:, 1]).all()
    assert np.abs(pcm).max() == round(0.5 * 32767)  # peak-normalised to -6 dBFS
    check_audio(s["wav"], s["txt"].decode(), json.loads(s["json"]))


def test_same_seed_same_bytes(small_run, tmp_path):
    out, manifest = small_run
    again = synth(SynthConfig(out_dir=str(tmp_path / "again"), **SMALL))
    assert again["modalities"] == manifest["modalities"]
    for modality in ("image", "video", "audio"):
        for shard in manifest["modalities"][modality]["shards"]:  # whole tar files, payloads included
            assert (out / shard["path"]).read_bytes() == (tmp_path / "again" / shard["path"]).read_bytes()


def test_mp4_bytes_match_in_a_fresh_process():
    """x264 gave different bytes for the same frames in different processes until mbtree was switched off."""
    code = (
        "import hashlib; from selfflow.data.synth import SynthConfig, make_sample; "
        "from selfflow.data.synth_visual import pick_video_codec; c = SynthConfig(); "
        "print(' '.join(hashlib.md5(make_sample(c, 'video', i, pick_video_codec())['mp4']).hexdigest() "
        "for i in range(32)))"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    cfg = SynthConfig()
    codec = synth_visual.pick_video_codec()
    here = [hashlib.md5(make_sample(cfg, "video", i, codec)["mp4"]).hexdigest() for i in range(32)]
    assert fresh == here


def test_other_seed_other_data(tmp_path):
    def samples(seed):
        return [make_sample(SynthConfig(out_dir="unused", seed=seed), "image", i, "libx264") for i in range(10)]

    a, b = samples(0), samples(1)
    assert [s["txt"] for s in a] != [s["txt"] for s in b]
    assert all(x["png"] != y["png"] for x, y in zip(a, b, strict=True))


def test_items_do_not_depend_on_counts(small_run, tmp_path):
    out, _ = small_run
    fewer = SynthConfig(out_dir=str(tmp_path), num_images=5, num_videos=2, num_audio=3, samples_per_shard=4)
    synth(fewer)
    for modality in ("image", "video", "audio"):
        small = read_samples(tmp_path, modality)
        big = {s["__key__"]: s for s in read_samples(out, modality)}
        for s in small:
            for field in (MEDIA[modality], "txt", "json"):
                assert s[field] == big[s["__key__"]][field]


def test_rerun_removes_stale_shards(tmp_path):
    synth(SynthConfig(out_dir=str(tmp_path), num_images=9, num_videos=0, num_audio=0, samples_per_shard=4))
    synth(SynthConfig(out_dir=str(tmp_path), num_images=3, num_videos=0, num_audio=0, samples_per_shard=4))
    assert sorted(p.name for p in (tmp_path / "image").iterdir()) == ["shard-000000.tar"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("out_dir", ""),
        ("seed", -1),
        ("num_images", -1),
        ("num_videos", -2),
        ("num_audio", -3),
        ("image_size", 16),
        ("video_size", 31),
        ("video_size", 24),
        ("video_frames", 1),
        ("fps", 0),
        ("audio_seconds", 0.1),
        ("sample_rate", 100),
        ("audio_channels", 3),
        ("audio_format", "mp3"),
        ("samples_per_shard", 0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SynthConfig(**{field: value})
    with pytest.raises(ConfigError, match=field):
        load_config(SynthConfig, None, [f"{field}={json.dumps(value)}"])
