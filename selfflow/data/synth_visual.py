"""Coloured shapes on a plain background: scenes, captions and pixels for the built-in image and video data.

A scene is sampled from a numpy Generator, captioned from its attributes only, and rendered with
4x4 supersampling (anti-aliased edges). Coordinates are in pixels, x to the right and y down, with
pixel (row j, column i) covering [i, i+1) x [j, j+1); an object's `center` is the centre of its
shape (for the triangle, the centroid), so the centroid of its pixels recovers it.

    scene = sample_image_scene(np.random.default_rng(0), size=32)
    image_caption(scene)              # 'two small red circles on the left, black background'
    pixels = render_image(scene, size=32)    # (32, 32, 3) uint8

Videos hold one object moving in a straight line; its per-frame centres are part of the scene, and
`encode_mp4` writes the frames with libx264 (yuv420p) or, where PyAV lacks it, mpeg4.
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.12, "large": 0.2}  # shape radius as a fraction of the image side
BOUND = 1.15  # every shape lies inside a circle of BOUND * radius (the triangle's circumradius)
GAP = 2.0  # pixels between the bounding circles of two objects, so none touch
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}

# Where an object's centre may lie, as fractions (x0, x1, y0, y1) of the image; opposite regions
# are 0.2 apart, so "left of" holds between any two objects placed left and right.
REGIONS = {
    "left": (0.0, 0.4, 0.0, 1.0),
    "right": (0.6, 1.0, 0.0, 1.0),
    "top": (0.0, 1.0, 0.0, 0.4),
    "bottom": (0.0, 1.0, 0.6, 1.0),
    "center": (0.4, 0.6, 0.4, 0.6),
}
REGION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATIONS = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = {"slow": 0.2, "fast": 0.4}  # distance travelled over the whole clip, as a fraction of the side
SPEED_ADVERBS = {"slow": "slowly", "fast": "quickly"}
SUPERSAMPLE = 4


@dataclass
class Group:
    """Objects that share one phrase of the caption, e.g. 'two small red circles'."""

    count: int
    shape: str
    color: str
    size: str
    region: str  # a key of REGIONS: where the centres of the group lie


@dataclass
class Shape:
    shape: str
    color: str
    rgb: list[int]
    size: str
    radius: float  # pixels, r: circle radius r, square half-side 0.8 r, triangle circumradius BOUND * r
    center: list[float]  # [x, y] in pixels
    group: int  # index into the scene's groups


@dataclass
class ImageScene:
    background: str
    background_rgb: list[int]
    groups: list[Group]
    relation: str | None  # None: one group at its region; else groups[0] <relation> groups[1]
    objects: list[Shape]


@dataclass
class VideoScene:
    background: str
    background_rgb: list[int]
    shape: str
    color: str
    rgb: list[int]
    size: str
    radius: float
    direction: str
    speed: str
    pixels_per_frame: float
    centers: list[list[float]]  # [x, y] per frame


# ---------------------------------------------------------------- captions


def group_phrase(g: Group) -> str:
    noun = g.shape if g.count == 1 else g.shape + "s"
    return f"{COUNT_WORDS[g.count]} {g.size} {g.color} {noun}"


def image_caption(scene: ImageScene) -> str:
    if scene.relation is None:
        text = f"{group_phrase(scene.groups[0])} {REGION_PHRASES[scene.groups[0].region]}"
    else:
        text = f"{group_phrase(scene.groups[0])} {scene.relation} {group_phrase(scene.groups[1])}"
    return f"{text}, {scene.background} background"


def video_caption(scene: VideoScene) -> str:
    return (
        f"a {scene.size} {scene.color} {scene.shape} moving {scene.direction} "
        f"{SPEED_ADVERBS[scene.speed]}, {scene.background} background"
    )


# ---------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, options, exclude=()) -> str:
    options = [o for o in options if o not in exclude]
    return options[int(rng.integers(len(options)))]


def _place(rng: np.random.Generator, group: Group, radius: float, size: int, placed: list[Shape]) -> list[float] | None:
    """A centre for a new object of `group` inside its region, GAP pixels clear of `placed`; None after 100 misses."""
    x0, x1, y0, y1 = REGIONS[group.region]
    margin = BOUND * radius + 0.5
    lo_x, hi_x = max(x0 * size, margin), min(x1 * size, size - margin)
    lo_y, hi_y = max(y0 * size, margin), min(y1 * size, size - margin)
    for _ in range(100):
        c = [float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))]
        if all(np.hypot(c[0] - o.center[0], c[1] - o.center[1]) > BOUND * (radius + o.radius) + GAP for o in placed):
            return [round(c[0], 3), round(c[1], 3)]
    return None


def sample_image_scene(rng: np.random.Generator, size: int) -> ImageScene:
    """One group at a region ('two small red circles on the left') or two groups in a spatial relation."""
    background = _pick(rng, BACKGROUNDS)
    while True:  # redraw in the rare case the objects do not fit
        if rng.random() < 0.5:
            relation = None
            region = _pick(rng, REGIONS)
            counts = [1 if region == "center" else int(rng.integers(1, 4))]
            regions = [region]
        else:
            relation = _pick(rng, RELATIONS)
            counts = [int(rng.integers(1, 3)), 1]
            regions = list(RELATIONS[relation])
        groups, objects = [], []
        for count, region in zip(counts, regions, strict=True):
            color = _pick(rng, PALETTE, exclude=[g.color for g in groups])  # groups differ in colour
            size_name = _pick(rng, SIZES) if count == 1 else "small"  # several large ones may not fit a region
            groups.append(Group(count, _pick(rng, SHAPES), color, size_name, region))
        for gi, g in enumerate(groups):
            radius = round(SIZES[g.size] * size, 3)
            for _ in range(g.count):
                center = _place(rng, g, radius, size, objects)
                if center is None:
                    break
                objects.append(Shape(g.shape, g.color, list(PALETTE[g.color]), g.size, radius, center, gi))
        if len(objects) == sum(counts):
            return ImageScene(background, list(BACKGROUNDS[background]), groups, relation, objects)


def sample_video_scene(rng: np.random.Generator, size: int, frames: int) -> VideoScene:
    """One object moving in a straight line at constant speed; the whole path stays in the frame."""
    background = _pick(rng, BACKGROUNDS)
    shape, color, size_name = _pick(rng, SHAPES), _pick(rng, PALETTE), _pick(rng, SIZES)
    direction, speed = _pick(rng, DIRECTIONS), _pick(rng, SPEEDS)
    radius = round(SIZES[size_name] * size, 3)
    margin = BOUND * radius + 0.5
    travel = SPEEDS[speed] * size
    dx, dy = DIRECTIONS[direction]
    along = float(rng.uniform(margin, size - margin - travel))  # start on the moving axis, measured from the back
    across = float(rng.uniform(margin, size - margin))
    step = travel / (frames - 1)
    centers = []
    for t in range(frames):
        pos = along + t * step if dx + dy > 0 else size - along - t * step
        x, y = (pos, across) if dx else (across, pos)
        centers.append([round(x, 3), round(y, 3)])
    return VideoScene(
        background=background,
        background_rgb=list(BACKGROUNDS[background]),
        shape=shape,
        color=color,
        rgb=list(PALETTE[color]),
        size=size_name,
        radius=radius,
        direction=direction,
        speed=speed,
        pixels_per_frame=round(step, 4),
        centers=centers,
    )


# ---------------------------------------------------------------- pixels


def shape_mask(shape: str, center: list[float], radius: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the points (x, y) that fall inside the shape."""
    dx, dy = x - center[0], y - center[1]
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * radius
    if shape == "triangle":  # equilateral, pointing up, circumradius BOUND * radius around the centre
        r = BOUND * radius
        # below the apex edges and above the base; the slanted edges have slope sqrt(3)
        return (dy <= r / 2) & (np.sqrt(3) * np.abs(dx) - dy <= r)
    raise ValueError(f"unknown shape {shape!r}")


def render(
    background_rgb: list[int], objects: list[tuple[str, list[int], list[float], float]], size: int
) -> np.ndarray:
    """(size, size, 3) uint8 image: objects `(shape, rgb, center, radius)` painted in order, anti-aliased."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # sub-pixel centres in pixel units
    x, y = np.meshgrid(coords, coords)
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = background_rgb
    for shape, rgb, center, radius in objects:
        cover = shape_mask(shape, center, radius, x, y).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
        img += cover[..., None] * (np.asarray(rgb, dtype=np.float64) - img)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_image(scene: ImageScene, size: int) -> np.ndarray:
    return render(scene.background_rgb, [(o.shape, o.rgb, o.center, o.radius) for o in scene.objects], size)


def render_video(scene: VideoScene, size: int) -> np.ndarray:
    """(frames, size, size, 3) uint8."""
    return np.stack(
        [render(scene.background_rgb, [(scene.shape, scene.rgb, c, scene.radius)], size) for c in scene.centers]
    )


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- mp4


def pick_video_codec() -> str:
    """libx264 when this PyAV build can encode it, else mpeg4 (in every FFmpeg build)."""
    import av  # imported here: only writing video needs FFmpeg

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except av.codec.codec.UnknownCodecError:
        return "mpeg4"


def encode_mp4(frames: np.ndarray, fps: int, codec: str) -> bytes:
    """Encode (T, H, W, 3) uint8 frames (H, W even) as yuv420p mp4 at high quality (x264 CRF 15)."""
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"yuv420p needs even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1  # tiny frames: threads only cost time
        # x264's macroblock-tree rate control made byte-different (same-looking) files from run to run here
        stream.options = {"crf": "15", "x264-params": "mbtree=0"} if codec == "libx264" else {"qmin": "1", "qmax": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed frames
            container.mux(packet)
    return buf.getvalue()
