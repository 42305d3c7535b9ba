"""`selfflow pack`: a folder of your own images / videos / audio files -> raw webdataset shards.

    selfflow pack src=~/photos out_dir=data/mine/raw                        # sidecar captions: a.jpg + a.txt
    selfflow pack src=~/clips out_dir=data/mine/raw captions=~/clips/captions.csv
    selfflow pack src=~/imagenet/train out_dir=data/in256/raw class_folders=true image_size=256

The output is what `selfflow prepare` reads (`raw_dir`), in the layout `selfflow synth` writes:

    out_dir/image/shard-000000.tar ...  samples: __key__ "image-00000042", png | jpg, txt, json
    out_dir/video/shard-000000.tar ...  samples: __key__ "video-00000007", mp4, txt, json
    out_dir/audio/shard-000000.tar ...  samples: __key__ "audio-00000003", flac, txt, json
    out_dir/summary.json                written / skipped (by reason, with example paths) / resized / cut
    out_dir/classes.json                class name -> label (class folders, or a `class` column)

A file's modality comes from its extension (`selfflow.data.raw.MEDIA_EXTENSIONS`). Its caption is,
in order: the row of `captions` (a CSV with a header or a JSONL file: `path` relative to `src`,
`caption`, optionally `label` (int) or `class` (name)), the sidecar `<stem>.txt` beside it, or (with
`class_folders`) the class folder's name. Labels of class folders are the sorted folder names'
indices, as torchvision's ImageFolder numbers them. The `json` of a sample holds `source` (the path
under `src`), `label` and what was changed.

Nothing is blown up: images are resized (shorter side to `image_size`, then centre-cropped to a
square; or, with `image_size` null, shrunk to at most `max_pixels`); videos are resampled to `fps`,
cut to `max_frames` and resized like images to `video_size`; audio is resampled to `sample_rate`,
mixed to `audio_channels` and cut to `max_seconds`. A file over `max_file_mb`, one that does not
decode, one without a caption and a decompression bomb are skipped, counted by reason and named.
"""

import csv
import io
import json
import math
import multiprocessing as mp
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from webdataset import TarWriter

from selfflow.data.raw import MEDIA_EXTENSIONS
from selfflow.progress import progress

EXTENSION_MODALITY = {ext: modality for modality, exts in MEDIA_EXTENSIONS.items() for ext in exts}
MAX_EXAMPLES = 10  # paths kept per skip reason in summary.json


@dataclass
class PackConfig:
    src: str = ""  # the folder of your files (searched recursively)
    out_dir: str = "data/mine/raw"  # raw shards for `selfflow prepare raw_dir=...`
    # null: sidecar captions (`<stem>.txt` beside each file); else a .csv (header: path,caption[,label|class])
    # or .jsonl ({"path", "caption"[, "label" | "class"]}) with paths relative to src
    captions: str | None = None
    class_folders: bool = False  # ImageFolder tree: src/<class>/<file>; label = index of the sorted class names
    # image: shorter side -> image_size (bicubic), centre crop to a square (ADM / SiT's ImageNet preprocessing);
    # null keeps the size, shrunk to at most max_pixels
    image_size: int | None = 256
    max_pixels: int = 4096 * 4096  # unknown, chosen because a 16 MP photo is the largest a GPU AE encodes at once
    video_size: int | None = 256  # shorter side, centre crop to a square; null: keep (shrunk to max_pixels)
    fps: float = 8.0  # frames kept per second (nearest frame); unknown, chosen as the built-in dataset's rate
    max_frames: int = 45  # the paper's Wan2.2 clips: 45 frames (4n + 1 suits causal video VAEs)
    sample_rate: int = 48000  # SongBloom / Oobleck rate (the paper's audio autoencoder)
    audio_channels: int = 2  # Oobleck is stereo; 1 mixes down
    max_seconds: float = 10.0  # the paper's audio clips: 10 s
    max_file_mb: float = 512.0  # larger files are skipped unread; unknown, chosen far above a 10 s clip
    samples_per_shard: int = 1000  # unknown, chosen because webdataset advises shards of 100 MB-1 GB
    workers: int = 2  # processes decoding and resizing

    def __post_init__(self):
        if not self.src or not self.out_dir:
            raise ValueError("src (your folder) and out_dir must be given")
        for name in ("image_size", "video_size"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 2):
                raise ValueError(f"{name} must be an even number >= 8 (or null), got {value}")
        if self.max_pixels < 64 or self.max_frames < 1 or self.fps <= 0 or self.max_seconds <= 0:
            raise ValueError("max_pixels >= 64, max_frames >= 1, fps > 0 and max_seconds > 0 are needed")
        if self.audio_channels not in (1, 2) or not 8000 <= self.sample_rate <= 192000:
            raise ValueError("audio_channels must be 1 or 2 and sample_rate in [8000, 192000]")
        if self.samples_per_shard < 1 or self.workers < 1 or self.max_file_mb <= 0:
            raise ValueError("samples_per_shard, workers >= 1 and max_file_mb > 0 are needed")


@dataclass
class Entry:
    path: str  # absolute
    source: str  # relative to src (posix)
    modality: str
    caption: str | None
    label: int  # -1: none


class UnpackableError(Exception):
    """A file that cannot be packed; the message is the reason (summary.json groups by it)."""


def pack(cfg: PackConfig) -> dict:
    """Pack every media file under `cfg.src` into raw shards under `cfg.out_dir`; returns the summary."""
    src = Path(cfg.src).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"src: {src} is not a folder")
    entries, classes, skipped = list_entries(cfg, src)
    if not entries:
        raise ValueError(f"no usable media files under {src} (extensions: {sorted(EXTENSION_MODALITY)})")
    out = Path(cfg.out_dir)
    earlier = sorted(str(p) for m in {e.modality for e in entries} for p in (out / m).glob("shard-*.tar"))
    if earlier:  # never mixed with (or silently deleting) shards an earlier pack wrote
        raise FileExistsError(f"{out} already holds shards ({earlier[0]}, ...): choose another out_dir or remove it")
    counts: dict[str, dict] = defaultdict(lambda: {"written": 0, "resized": 0, "cut": 0, "shards": 0})
    writers: dict[str, TarWriter] = {}
    try:
        # forkserver: a process that already runs torch / DeepSpeed threads must not be forked
        pool = ProcessPoolExecutor(cfg.workers, mp.get_context("forkserver")) if cfg.workers > 1 else None
        with pool or nullcontext(), progress(total=len(entries), desc="pack", unit="file") as bar:
            mapper = pool.map if pool else map
            results = mapper(encode_entry, [cfg] * len(entries), entries, **({"chunksize": 8} if pool else {}))
            for entry, result in zip(entries, results, strict=True):
                bar.update(1)
                if isinstance(result, str):
                    skipped[result].append(entry.source)
                    continue
                members, changes = result
                count = counts[entry.modality]
                index = count["written"]
                if index % cfg.samples_per_shard == 0:
                    if entry.modality in writers:
                        writers.pop(entry.modality).close()
                    folder = out / entry.modality
                    folder.mkdir(parents=True, exist_ok=True)
                    shard = folder / f"shard-{index // cfg.samples_per_shard:06d}.tar"
                    writers[entry.modality] = TarWriter(str(shard))
                    count["shards"] += 1
                meta = {"source": entry.source, "label": entry.label, **changes}
                key = f"{entry.modality}-{index:08d}"
                writers[entry.modality].write({"__key__": key, **members, "txt": entry.caption, "json": meta})
                count["written"] += 1
                count["resized"] += int(bool(changes.get("resized_from")))
                count["cut"] += int(bool(changes.get("cut_from")))
    finally:
        for writer in writers.values():
            writer.close()
    summary = {
        "src": str(src),
        "out_dir": str(out),
        "modalities": dict(counts),
        "skipped": sum(len(v) for v in skipped.values()),
        "reasons": {r: {"count": len(v), "examples": v[:MAX_EXAMPLES]} for r, v in sorted(skipped.items())},
        "config": asdict(cfg),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if classes:
        (out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")
    print_summary(summary)
    return summary


def list_entries(cfg: PackConfig, src: Path) -> tuple[list[Entry], dict[str, int], dict[str, list[str]]]:
    """Every media file under src (sorted) with its caption and label; files that cannot be captioned or
    are too large are returned as skipped, by reason."""
    skipped: dict[str, list[str]] = defaultdict(list)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix[1:].lower() in EXTENSION_MODALITY)
    rows = read_captions(Path(cfg.captions).expanduser(), src) if cfg.captions else None
    classes: dict[str, int] = {}
    if cfg.class_folders:
        names = sorted({p.relative_to(src).parts[0] for p in files if len(p.relative_to(src).parts) > 1})
        classes = {name: i for i, name in enumerate(names)}
    elif rows is not None:
        names = sorted({row["class"] for row in rows.values() if row.get("class") is not None})
        classes = {name: i for i, name in enumerate(names)}
    entries = []
    limit = cfg.max_file_mb * 1e6
    for path in files:
        source = path.relative_to(src).as_posix()
        caption, label = None, -1
        if cfg.class_folders:
            parts = path.relative_to(src).parts
            if len(parts) < 2:
                skipped["not inside a class folder"].append(source)
                continue
            label, caption = classes[parts[0]], parts[0]
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() or caption
        if rows is not None:
            row = rows.get(source)
            if row is None and not cfg.class_folders:
                skipped["not listed in captions"].append(source)
                continue
            if row is not None:
                caption = row["caption"] or caption
                if row.get("label") is not None:
                    label = int(row["label"])
                elif row.get("class") is not None:
                    label = classes[row["class"]]
        if not caption:
            skipped["no caption"].append(source)
            continue
        if path.stat().st_size > limit:
            skipped[f"file over max_file_mb={cfg.max_file_mb:g}"].append(source)
            continue
        modality = EXTENSION_MODALITY[path.suffix[1:].lower()]
        entries.append(Entry(str(path), source, modality, caption, label))
    return entries, classes, skipped


def read_captions(path: Path, src: Path) -> dict[str, dict]:
    """path (relative to src, posix) -> {"caption", "label" | "class"} from a CSV (with header) or JSONL."""
    if not path.is_file():
        raise FileNotFoundError(f"captions: {path} not found")
    rows: list[dict] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"path", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"captions: {path} has no column(s) {sorted(missing)} (header: {reader.fieldnames})")
            rows = list(reader)
    elif path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"captions: {path} line {number} is not JSON ({err})") from err
            if not isinstance(row, dict) or "path" not in row or "caption" not in row:
                raise ValueError(f'captions: {path} line {number} needs "path" and "caption"')
            rows.append(row)
    else:
        raise ValueError(f"captions: {path} must be a .csv or a .jsonl file")
    out = {}
    for number, row in enumerate(rows, 1):
        label = row.get("label")
        if label not in (None, ""):
            try:
                row["label"] = int(label)
            except (TypeError, ValueError) as err:
                raise ValueError(f"captions: {path} row {number}: label {label!r} is not an integer") from err
        else:
            row["label"] = None
        row["class"] = row.get("class") or None
        relative = Path(str(row["path"]))
        if relative.is_absolute():
            relative = relative.relative_to(src) if relative.is_relative_to(src) else relative
        out[relative.as_posix()] = row
    return out


def encode_entry(cfg: PackConfig, entry: Entry) -> tuple[dict, dict] | str:
    """(tar members, what was changed) for one file, or the reason it was skipped."""
    try:
        data = Path(entry.path).read_bytes()
        if entry.modality == "image":
            return pack_image(cfg, data, Path(entry.path).suffix[1:].lower())
        if entry.modality == "video":
            return pack_video(cfg, data)
        return pack_audio(cfg, data)
    except UnpackableError as err:
        return str(err)
    except Exception as err:  # any decoder's complaint: the file is skipped, named and counted
        return f"does not decode ({type(err).__name__})"


def fit_size(width: int, height: int, side: int | None, max_pixels: int) -> tuple[int, int, bool]:
    """(resized width, height, crop to square?) for `side` (shorter side, then crop) or the pixel cap."""
    if side is not None:
        scale = side / min(width, height)
        return max(side, round(width * scale)), max(side, round(height * scale)), True
    if width * height <= max_pixels:
        return width, height, False
    scale = math.sqrt(max_pixels / (width * height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2), False


def resize_crop(img, side: int | None, max_pixels: int):
    """A PIL image resized (bicubic, box-reduced first when far larger) and centre-cropped as `fit_size` says."""
    from PIL import Image

    width, height, crop = fit_size(*img.size, side, max_pixels)
    if (width, height) != img.size:
        factor = min(img.size[0] // width, img.size[1] // height)
        if factor >= 2:  # ADM's preprocessing also box-downsamples before the bicubic step
            img = img.reduce(factor)
        img = img.resize((width, height), Image.Resampling.BICUBIC)
    if crop:
        left, top = (width - side) // 2, (height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return img


def pack_image(cfg: PackConfig, data: bytes, ext: str) -> tuple[dict, dict]:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            size = img.size
            if cfg.image_size and img.format == "JPEG":  # decode at a reduced scale: far less memory and time
                img.draft("RGB", (cfg.image_size, cfg.image_size))
            img = img.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise UnpackableError("decompression bomb (more pixels than PIL allows)") from err
    if size[0] < 8 or size[1] < 8:
        raise UnpackableError("image smaller than 8x8")
    out = resize_crop(img, cfg.image_size, cfg.max_pixels)
    changes = {"resized_from": list(size)} if out.size != tuple(size) else {}
    if not changes and ext in ("png", "jpg", "jpeg"):
        return {"jpg" if ext == "jpeg" else ext: data}, changes  # unchanged: the original bytes
    buf = io.BytesIO()
    if ext == "png":
        out.save(buf, format="PNG")
        return {"png": buf.getvalue()}, changes
    out.save(buf, format="JPEG", quality=95)
    return {"jpg": buf.getvalue()}, changes


def pack_video(cfg: PackConfig, data: bytes) -> tuple[dict, dict]:
    import av
    from PIL import Image

    from selfflow.data.synth_visual import encode_mp4, pick_video_codec

    frames, times = [], []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            times.append(float(frame.time) if frame.time is not None else len(times) / float(stream.average_rate or 25))
            frames.append(frame.to_image())
    if not frames:
        raise UnpackableError("video has no frames")
    # the frame nearest each 1/fps tick, from the first frame's time
    start, duration = times[0], times[-1] - times[0]
    ticks = np.arange(0, duration + 1e-9, 1 / cfg.fps) + start
    picked = [int(np.argmin(np.abs(np.asarray(times) - tick))) for tick in ticks] or [0]
    changes: dict = {}
    if len(picked) > cfg.max_frames:
        changes["cut_from"] = len(picked)
        picked = picked[: cfg.max_frames]
    size = frames[0].size
    out = [resize_crop(frames[i], cfg.video_size, cfg.max_pixels) for i in picked]
    width, height = out[0].size
    if width % 2 or height % 2:  # yuv420p: even sides
        out = [img.resize((width // 2 * 2, height // 2 * 2), Image.Resampling.BICUBIC) for img in out]
    if out[0].size != size:
        changes["resized_from"] = list(size)
    pixels = np.stack([np.asarray(img.convert("RGB")) for img in out])
    changes["fps"] = cfg.fps
    return {"mp4": encode_mp4(pixels, round(cfg.fps), pick_video_codec())}, changes


def pack_audio(cfg: PackConfig, data: bytes) -> tuple[dict, dict]:
    import soundfile as sf

    from selfflow.data.raw import decode_audio

    info = sf.info(io.BytesIO(data))
    wave = decode_audio(data, cfg.audio_channels, cfg.sample_rate)  # (C, samples) float32
    changes: dict = {}
    limit = round(cfg.max_seconds * cfg.sample_rate)
    if wave.shape[1] > limit:
        changes["cut_from"] = round(wave.shape[1] / cfg.sample_rate, 3)
        wave = wave[:, :limit]
    if info.samplerate != cfg.sample_rate:
        changes["resampled_from"] = info.samplerate
    buf = io.BytesIO()
    sf.write(buf, wave.clamp(-1, 1).T.numpy(), cfg.sample_rate, format="FLAC", subtype="PCM_16")
    return {"flac": buf.getvalue()}, changes


def print_summary(summary: dict) -> None:
    for name, m in summary["modalities"].items():
        print(f"{name}: {m['written']} written to {m['shards']} shard(s), {m['resized']} resized, {m['cut']} cut")
    for reason, r in summary["reasons"].items():
        more = ", ..." if r["count"] > len(r["examples"]) else ""
        print(f"  skipped ({reason}): {r['count']} ({', '.join(r['examples'])}{more})")
    print(f"wrote {summary['out_dir']} ({summary['out_dir']}/summary.json)")
