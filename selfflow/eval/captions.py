"""Caption-following accuracy on the built-in dataset, measured from pixels and samples by plain signal processing.

Every item of `selfflow synth` stores in its `json` the attributes its caption states (see
`selfflow/data/synth_visual.py` and `synth_audio.py`). Given media (real, or generated from that
caption) and those attributes, the scorers here measure the media directly, with no learned model,
and say for each stated attribute whether the media shows it:

    image  background, color, shape, size, count, layout (the region or the relation)
    video  background, color, shape, size, direction, speed
    audio  pitch, onsets, tempo (melodies and rhythms only), timbre

Only what the caption states is checked: a caption names a region or a relation, not coordinates,
so a sample generated from it is never compared with the stored object centres (an earlier version
checked colour at those centres and each blob's distance to them, which no sample could know).

    from selfflow.eval.captions import caption_accuracy, read_items
    items = read_items("data/synth/raw/image", "image")  # [(pixels (H, W, 3) uint8, attributes), ...]
    caption_accuracy("image", items)  # {"per_attribute": {"color": 1.0, ...}, "overall": ..., ...}

Pictures: the background is the median border colour. A stated colour's coverage of a pixel is its
position on the blend line from the background to that colour (shapes are anti-aliased by blending,
`synth_visual.render`), zero where another palette colour's line passes nearer; blobs are the
4-connected components where coverage > 0.5, widened by one pixel for their rim, and measured on luma
where colour and background differ enough in it (yuv420p keeps luma at full resolution, chroma at
half). A blob's centre is its weighted centroid (the stated `center` is the shape's centroid), its
shape follows from its moments (`TRIANGLE_SKEW`, `SQUARENESS`), its size is the `SIZES` radius that
best gives its area for the stated shape. Small shapes whose colour barely differs from the background
in luma (green on gray) are read from 2x2 chroma alone: about 1% of real videos' shapes are misread.

Sound: pitch is the loudest FFT peak (each timbre's fundamental is its loudest partial, `synth_audio`)
within half a semitone; onsets are where a 5 ms peak envelope rises through 10% of its maximum after
a quiet spell; tempo is the autocorrelation peak of the onsets; timbre is the nearest of the four
timbres rendered at the stated notes, compared by harmonic amplitudes and decay.

Coordinates are scaled by the media's side over the stated `image_size` / `video_size`; a check that
cannot apply (tempo of a clip with one note) is left out, and `caption_accuracy` counts per attribute
only the items that state it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfflow.data import synth_audio, synth_visual
from selfflow.data.raw import decode_audio, decode_image, decode_video, find_media, read_shard
from selfflow.eval.media import to_uint8

OFF_LINE = 60.0  # RGB distance from the blend line beyond which a pixel is another colour (mp4 chroma bleeds)
# Shape from moments of the coverage about its centre (more robust to blur than a bounding box): an
# upward triangle's skewness along y is -2 sqrt(2) / 5 = -0.57 (circle and square 0), and
# E[x^2 y^2] / mean(E[x^4], E[y^4]) is 1/3 for a disc and 5/9 for a square. Blur (yuv420p chroma, a
# generator's softness) pulls both toward a Gaussian's values (0 and 1/3), so the cuts sit nearer those.
TRIANGLE_SKEW = -0.2
SQUARENESS = 0.4
LUMA = np.array([0.299, 0.587, 0.114])  # BT.601, the luma of yuv420p
LUMA_CONTRAST = 40.0  # below this luma step between colour and background, luma says too little
# area / radius^2 of each shape as `synth_visual.shape_mask` draws it (square half-side 0.8 r; the
# triangle is equilateral with circumradius BOUND r, area 3 sqrt(3) / 4 R^2)
AREA_PER_R2 = {"circle": np.pi, "square": 1.6**2, "triangle": 3 * np.sqrt(3) / 4 * synth_visual.BOUND**2}
MIN_AREA = 0.3  # blobs below this fraction of the stated object's area are specks, not objects
HALF_SEMITONE = 0.5
TEMPO_TOLERANCE = 0.04  # relative; the built-in tempos are >= 10% apart
HARMONICS = 6


# ---------------------------------------------------------------- reading shards


def read_items(shard_dir: str | Path, modality: str) -> list[tuple[np.ndarray, dict]]:
    """Decoded `(media, attributes)` of every sample in `shard_dir/shard-*.tar`, in the scorers' formats:
    image (H, W, 3) uint8, video (T, H, W, 3) uint8, audio (S,) float32 mono at the stated sample rate."""
    shards = sorted(Path(shard_dir).glob("shard-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shard-*.tar in {shard_dir}")
    items = []
    for shard in shards:
        for sample in read_shard(shard):
            found = find_media(sample, modality)
            if found is None or "json" not in sample:
                raise ValueError(f"{shard}: sample {sample['__key__']} lacks {modality} media or json")
            attrs = json.loads(sample["json"])
            items.append((decode_media(modality, found[1], attrs), attrs))
    return items


def decode_media(modality: str, data: bytes, attrs: dict) -> np.ndarray:
    """Encoded media -> the scorers' format (decoded by `selfflow.data.raw`, mapped back from [-1, 1])."""
    if modality == "image":
        return to_uint8(decode_image(data, channels=3)[None])[0]
    if modality == "video":
        return to_uint8(decode_video(data)[None])[0]
    if modality == "audio":
        return decode_audio(data, channels=1, sample_rate=attrs["sample_rate"])[0].numpy()
    raise ValueError(f"unknown modality {modality!r} (image, video or audio)")


# ---------------------------------------------------------------- pictures


@dataclass
class Blob:
    center: tuple[float, float]  # (x, y) in pixels
    area: float  # coverage-weighted pixels
    skew: float  # skewness of the coverage along y
    squareness: float  # E[x^2 y^2] / mean(E[x^4], E[y^4]) about the centre


def border_color(frames: np.ndarray) -> np.ndarray:
    """Median RGB of the outermost pixels of (..., H, W, 3) frames."""
    f = frames.reshape(-1, *frames.shape[-3:])
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], axis=1)
    return np.median(border.reshape(-1, 3).astype(np.float64), axis=0)


def nearest(value: float | np.ndarray, table: dict) -> str:
    """The key of `table` whose value is closest to `value`."""
    return min(table, key=lambda k: float(np.linalg.norm(np.asarray(table[k], dtype=np.float64) - value)))


def blend(pixels: np.ndarray, bg: np.ndarray, rgb) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the fraction `a` of `rgb` blended over `bg` that comes closest, and the RGB distance left."""
    d = np.asarray(rgb, dtype=np.float64) - bg
    px = pixels.astype(np.float64) - bg
    a = np.clip(px @ d / max(float(d @ d), 1.0), 0.0, 1.0)
    return a, np.linalg.norm(px - a[..., None] * d, axis=-1)


def coverage(pixels: np.ndarray, bg: np.ndarray, color: str) -> np.ndarray:
    """(H, W) fraction of palette `color` blended over `bg` per pixel; 0 where the pixel is off that blend
    line or lies nearer the blend line of another palette colour (orange is 56 RGB from the yellow line)."""
    a, off = blend(pixels, bg, synth_visual.PALETTE[color])
    others = [blend(pixels, bg, rgb)[1] for name, rgb in synth_visual.PALETTE.items() if name != color]
    mine = (off <= OFF_LINE) & (off <= np.min(others, axis=0))
    return np.where(mine, a, 0.0)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask (labels spread by a max filter until stable)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        p = np.pad(labels, 1)
        spread = np.maximum.reduce([labels, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        spread = np.where(mask, spread, 0)
        if (spread == labels).all():
            return [labels == v for v in np.unique(labels[labels > 0])]
        labels = spread


def dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def luma_coverage(pixels: np.ndarray, bg: np.ndarray, color: str) -> np.ndarray | None:
    """(H, W) fraction of palette `color` over `bg` from luma alone, which yuv420p keeps at full resolution
    (its chroma is 2x2 subsampled); None where the two differ too little in luma to tell."""
    step = (np.asarray(synth_visual.PALETTE[color], dtype=np.float64) - bg) @ LUMA
    if abs(step) < LUMA_CONTRAST:
        return None
    return np.clip((pixels.astype(np.float64) - bg) @ LUMA / step, 0.0, 1.0)


def find_blobs(cov: np.ndarray, min_area: float, fine: np.ndarray | None = None) -> list[Blob]:
    """Blobs where `cov` > 0.5, largest first, measured on `fine` (else `cov`); those under `min_area` dropped."""
    ys, xs = np.mgrid[0 : cov.shape[0], 0 : cov.shape[1]] + 0.5  # pixel centres
    blobs = []
    for comp in components(cov > 0.5):
        w = (cov if fine is None else fine) * dilate(comp)  # the anti-aliased rim belongs to the blob
        area = float(w.sum())
        if area < min_area:
            continue
        cx, cy = float((w * xs).sum() / area), float((w * ys).sum() / area)
        x, y = xs - cx, ys - cy
        skew = (w * y**3).sum() / area / max((w * y * y).sum() / area, 1e-9) ** 1.5
        squareness = (w * x * x * y * y).sum() / max(0.5 * (w * (x**4 + y**4)).sum(), 1e-9)
        blobs.append(Blob((cx, cy), area, float(skew), float(squareness)))
    return sorted(blobs, key=lambda b: -b.area)


def shape_of(blob: Blob) -> str:
    if blob.skew < TRIANGLE_SKEW:
        return "triangle"
    return "square" if blob.squareness > SQUARENESS else "circle"


def size_of(blob: Blob, shape: str, side: float) -> str:
    """The `SIZES` name whose radius, for the stated shape, best gives the blob's area."""
    return nearest(np.sqrt(blob.area / AREA_PER_R2[shape]) / side, synth_visual.SIZES)


def in_region(center, region: str, side: float) -> bool:
    x, y = center[0] / side, center[1] / side
    if region == "center":  # centres are drawn within 0.1 of the middle (synth_visual.REGIONS)
        return abs(x - 0.5) < 0.15 and abs(y - 0.5) < 0.15
    return {"left": x < 0.5, "right": x > 0.5, "top": y < 0.5, "bottom": y > 0.5}[region]


def in_relation(first: list[Blob], second: list[Blob], relation: str) -> bool:
    """Every blob of the first group lies `relation` ('left of', 'above', ...) every blob of the second."""
    axis, sign = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}[relation]
    if not first or not second:
        return False
    return all(sign * (a.center[axis] - b.center[axis]) < 0 for a in first for b in second)


def check_pixels(pixels: np.ndarray, name: str, ndim: int) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim != ndim or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        want = "(H, W, 3)" if ndim == 3 else "(T, H, W, 3)"
        raise ValueError(f"{name}: expected {want} uint8 pixels, got shape {pixels.shape} dtype {pixels.dtype}")
    return pixels


def score_image(pixels: np.ndarray, attributes: dict) -> dict[str, bool]:
    """Whether `pixels` (H, W, 3) uint8 show each attribute of a synth image's `json`, one bool per attribute."""
    pixels = check_pixels(pixels, "score_image", 3)
    scale = pixels.shape[1] / attributes["image_size"]
    side = pixels.shape[1]
    bg = border_color(pixels)
    ok = dict.fromkeys(("color", "shape", "size", "count"), True)
    ok["background"] = nearest(bg, synth_visual.BACKGROUNDS) == attributes["background"]
    group_blobs = []
    for gi, g in enumerate(attributes["groups"]):
        cov = coverage(pixels, bg, g["color"])
        radius = next(o["radius"] for o in attributes["objects"] if o["group"] == gi) * scale
        fine = luma_coverage(pixels, bg, g["color"])
        blobs = find_blobs(cov, MIN_AREA * AREA_PER_R2[g["shape"]] * radius**2, fine)
        group_blobs.append(blobs)
        ok["count"] &= len(blobs) == g["count"]
        ok["color"] &= bool(blobs)  # an object of the stated colour is there
        ok["shape"] &= bool(blobs) and all(shape_of(b) == g["shape"] for b in blobs)
        ok["size"] &= bool(blobs) and all(size_of(b, g["shape"], side) == g["size"] for b in blobs)
    if attributes["relation"] is None:
        region = attributes["groups"][0]["region"]
        ok["layout"] = bool(group_blobs[0]) and all(in_region(b.center, region, side) for b in group_blobs[0])
    else:
        ok["layout"] = in_relation(group_blobs[0], group_blobs[1], attributes["relation"])
    return {k: bool(v) for k, v in ok.items()}


def score_video(frames: np.ndarray, attributes: dict) -> dict[str, bool]:
    """Whether `frames` (T, H, W, 3) uint8 show each attribute of a synth video's `json`."""
    frames = check_pixels(frames, "score_video", 4)
    scale = frames.shape[2] / attributes["video_size"]
    side = frames.shape[2]
    bg = border_color(frames)
    radius = attributes["radius"] * scale
    covs = [coverage(f, bg, attributes["color"]) for f in frames]
    min_area = MIN_AREA * AREA_PER_R2[attributes["shape"]] * radius**2
    blobs = [
        find_blobs(c, min_area, luma_coverage(f, bg, attributes["color"]))[:1]
        for f, c in zip(frames, covs, strict=True)
    ]
    seen = [(t, b[0]) for t, b in enumerate(blobs) if b]
    ok = {"background": nearest(bg, synth_visual.BACKGROUNDS) == attributes["background"]}
    ok["color"] = len(seen) >= max(2, len(frames) // 2)  # an object of the stated colour in most frames
    if not ok["color"]:  # the object is missing from too many frames to measure
        return ok | dict.fromkeys(("shape", "size", "direction", "speed"), False)
    area, skew, squareness = np.median([(b.area, b.skew, b.squareness) for _, b in seen], axis=0)
    typical = Blob((0.0, 0.0), float(area), float(skew), float(squareness))  # the median blob over the frames
    ok["shape"] = shape_of(typical) == attributes["shape"]
    ok["size"] = size_of(typical, attributes["shape"], side) == attributes["size"]
    t = np.array([t for t, _ in seen], dtype=np.float64)
    xy = np.array([b.center for _, b in seen])
    travel = np.polyfit(t, xy, 1)[0] * (len(frames) - 1)  # (dx, dy) of a straight-line fit over the clip
    axis = int(np.argmax(np.abs(travel)))
    direction = [("left", "right"), ("up", "down")][axis][int(travel[axis] > 0)]
    ok["direction"] = direction == attributes["direction"]
    ok["speed"] = nearest(abs(travel[axis]) / side, synth_visual.SPEEDS) == attributes["speed"]
    return {k: bool(v) for k, v in ok.items()}


# ---------------------------------------------------------------- sound


def mono(waveform) -> np.ndarray:
    """(S,) or (C, S) samples -> (S,) float64, channels averaged."""
    x = np.asarray(waveform, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"score_audio: expected (S,) or (C, S) samples, got shape {np.shape(waveform)}")
    return x


def semitones(hz: float, ref: float) -> float:
    return 12 * float(np.log2(max(hz, 1e-6) / ref))


def spectrum(x: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies and magnitudes of the Hann-windowed FFT, zero-padded to below 1 Hz a bin."""
    n = 1 << int(np.ceil(np.log2(max(4 * len(x), sample_rate))))
    return np.fft.rfftfreq(n, 1 / sample_rate), np.abs(np.fft.rfft(x * np.hanning(len(x)), n))


def peak_hz(x: np.ndarray, sample_rate: int) -> float:
    """The loudest frequency between 30 Hz and 0.45 x the sample rate (the synth's partials stop there)."""
    freqs, mag = spectrum(x, sample_rate)
    band = (freqs >= 30) & (freqs <= 0.45 * sample_rate)
    return float(freqs[band][np.argmax(mag[band])])


def envelope(x: np.ndarray, sample_rate: int) -> tuple[np.ndarray, float]:
    """Peak |x| over 5 ms windows every 1 ms, and the hop in seconds."""
    hop, win = max(1, sample_rate // 1000), max(1, sample_rate // 200)
    if len(x) < win:
        return np.abs(x[:1]), hop / sample_rate
    frames = np.lib.stride_tricks.sliding_window_view(np.abs(x), win)[::hop]
    return frames.max(axis=1), hop / sample_rate


def detect_onsets(x: np.ndarray, sample_rate: int) -> list[float]:
    """Seconds at which the envelope rises through 10% of its maximum after at least 10 ms below 2% of it
    (the synth leaves silence between the notes of melodies and rhythms; a plucked chord's decaying,
    beating tail crosses 10% again and again, but is never that quiet)."""
    env, hop_s = envelope(x, sample_rate)
    loud, quiet = env > 0.1 * env.max(), env < 0.02 * env.max()
    onsets, armed, quiet_for = [], True, 0
    for i in range(len(env)):
        if armed and loud[i]:
            # a window starting at frame i first holds a note's 10% point (5 ms attack) about 5 ms later
            onsets.append(0.0 if i == 0 else i * hop_s + 0.005)
            armed, quiet_for = False, 0
        elif not armed:
            quiet_for = quiet_for + 1 if quiet[i] else 0
            armed = quiet_for * hop_s >= 0.01
    return onsets


def estimate_bpm(onsets: list[float], seconds: float) -> float:
    """60 / the lag of the autocorrelation peak of the onsets (as 10 ms Gaussian bumps on a 1 ms grid), for
    lags from 0.2 s (300 bpm) up to 1 s (60 bpm) or the clip's length; 0 when there is no peak."""
    hop_s = 0.001
    t = np.arange(0.0, seconds, hop_s)
    train = sum((np.exp(-0.5 * ((t - o) / 0.01) ** 2) for o in onsets), np.zeros_like(t))
    ac = np.correlate(train, train, mode="full")[len(train) - 1 :]
    lo, hi = int(round(0.2 / hop_s)), min(int(round(1.0 / hop_s)), len(ac) - 2)
    if hi <= lo or ac[lo : hi + 1].max() < 0.5 * ac[0] / max(len(onsets), 1):  # no pair of onsets in range
        return 0.0
    k = lo + int(np.argmax(ac[lo : hi + 1]))
    a, b, c = ac[k - 1], ac[k], ac[k + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c < 0 else 0.0  # parabolic peak
    return 60.0 / ((k + shift) * hop_s)


def note_segment(x: np.ndarray, note: dict, sample_rate: int) -> np.ndarray:
    """The samples of a stated note, skipping its 5 ms attack."""
    start = int((note["onset"] + synth_audio.ATTACK_S) * sample_rate)
    return x[start : int((note["onset"] + note["duration"]) * sample_rate)]


def pitch_ok(x: np.ndarray, sample_rate: int, attributes: dict) -> bool:
    """Single notes, melodies and rhythms: each note's loudest frequency within half a semitone of its stated
    one. Chords: every stated tone stands out (>= 20% of the loudest peak) within half a semitone."""
    notes = attributes["notes"]
    if attributes["template"] == "chord":
        freqs, mag = spectrum(x, sample_rate)
        near = [np.abs(12 * np.log2(np.maximum(freqs, 1e-6) / n["hz"])) < HALF_SEMITONE for n in notes]
        return all(mag[m].max() >= 0.2 * mag.max() for m in near)
    for n in notes:
        seg = note_segment(x, n, sample_rate)
        if len(seg) < sample_rate // 100 or abs(semitones(peak_hz(seg, sample_rate), n["hz"])) >= HALF_SEMITONE:
            return False
    return True


def timbre_profile(x: np.ndarray, sample_rate: int, note: dict) -> np.ndarray:
    """log10 of harmonics 2..6 over the fundamental, and of the RMS of the note's second half over its first."""
    seg = note_segment(x, note, sample_rate)
    if len(seg) < 8:
        return np.full(HARMONICS, -3.0)
    freqs, mag = spectrum(seg, sample_rate)
    near = [np.abs(freqs - k * note["hz"]) <= 0.015 * k * note["hz"] for k in range(1, HARMONICS + 1)]
    amps = [mag[m].max(initial=0.0) for m in near]  # a harmonic above the Nyquist frequency is 0
    half = len(seg) // 2
    decay = np.sqrt(np.mean(seg[half:] ** 2) / max(np.mean(seg[:half] ** 2), 1e-12))
    return np.log10(np.array([*amps[1:], decay * amps[0]]) / max(amps[0], 1e-12) + 1e-3)


def timbre_of(x: np.ndarray, sample_rate: int, attributes: dict) -> str:
    """The timbre whose rendering of the stated notes (synth_audio) has the nearest profile on the first note."""
    seconds = len(x) / sample_rate  # a generated clip may be shorter than stated
    notes = [synth_audio.Note(**n) for n in attributes["notes"] if n["onset"] < seconds]
    profile = timbre_profile(x, sample_rate, attributes["notes"][0])
    distance = {}
    for timbre in synth_audio.TIMBRE_WORDS:
        clip = synth_audio.AudioClip(attributes["template"], timbre, notes, None, None, None, seconds)
        ref = synth_audio.render_audio(clip, sample_rate, 1)[:, 0] / 32767
        distance[timbre] = float(np.linalg.norm(timbre_profile(ref, sample_rate, attributes["notes"][0]) - profile))
    return min(distance, key=distance.get)


def score_audio(waveform, sample_rate: int, attributes: dict) -> dict[str, bool]:
    """Whether a waveform (S,) or (C, S) shows each attribute of a synth clip's `json`: pitch, onsets, timbre,
    and tempo for melodies and rhythms of two notes or more."""
    x = mono(waveform)
    found = detect_onsets(x, sample_rate)
    stated = [n["onset"] for n in attributes["notes"]]
    if attributes["template"] == "chord":
        stated = stated[:1]  # the chord's tones start together
    ok = {
        "pitch": pitch_ok(x, sample_rate, attributes),
        "onsets": len(found) == len(stated) and all(abs(f - s) <= 0.03 for f, s in zip(found, stated, strict=True)),
        "timbre": timbre_of(x, sample_rate, attributes) == attributes["timbre"],
    }
    if attributes.get("tempo_bpm") and len(stated) >= 2:  # one beat in the clip shows no tempo
        bpm = estimate_bpm(found, len(x) / sample_rate)
        ok["tempo"] = abs(bpm / attributes["tempo_bpm"] - 1) <= TEMPO_TOLERANCE
    return {k: bool(v) for k, v in ok.items()}


# ---------------------------------------------------------------- accuracy


def caption_accuracy(modality: str, items, sample_rate: int | None = None) -> dict:
    """Per-attribute and overall caption-following accuracy of `(media, attributes)` items.

    Media as the scorers take them (image (H, W, 3) uint8, video (T, H, W, 3) uint8, audio (S,) or
    (C, S) at `sample_rate`, by default the stated one). Returns `per_attribute` (fraction of the items
    that state the attribute and show it), `checked` (how many items state it), `overall` (the mean of
    the per-attribute accuracies), `all_correct` (fraction of items showing every attribute) and `count`.
    """
    return summarise(modality, caption_scores(modality, items, sample_rate))


def caption_scores(modality: str, items, sample_rate: int | None = None) -> list[dict[str, bool]]:
    """For each `(media, attributes)` item, whether the media shows each attribute it states (scores of
    several processes' items concatenate, and `summarise` of them equals `caption_accuracy` of all)."""
    if modality not in ("image", "video", "audio"):
        raise ValueError(f"unknown modality {modality!r} (image, video or audio)")
    scores = []
    for media, attrs in items:
        if modality == "image":
            scores.append(score_image(media, attrs))
        elif modality == "video":
            scores.append(score_video(media, attrs))
        else:
            scores.append(score_audio(media, sample_rate or attrs["sample_rate"], attrs))
    return scores


def summarise(modality: str, scores: list[dict[str, bool]]) -> dict:
    """`caption_accuracy`'s numbers from per-item `caption_scores`."""
    if not scores:
        raise ValueError(f"caption_accuracy: no {modality} items to score")
    hits: dict[str, list[bool]] = {}
    for item in scores:
        for name, hit in item.items():
            hits.setdefault(name, []).append(hit)
    per_attribute = {name: float(np.mean(v)) for name, v in sorted(hits.items())}
    return {
        "modality": modality,
        "count": len(scores),
        "per_attribute": per_attribute,
        "checked": {name: len(v) for name, v in sorted(hits.items())},
        "overall": float(np.mean(list(per_attribute.values()))),
        "all_correct": float(np.mean([all(item.values()) for item in scores])),
    }
