"""The built-in dataset: captioned shapes (PNG), moving shapes (mp4) and synthesised notes (FLAC/WAV).

Everything is generated from a seed, so a fresh machine needs no download. Item i of a modality
depends only on (seed, modality, i), so changing a count never changes the items before it, and
the same config gives byte-identical PNG/audio payloads, captions and attributes. Output:

    out_dir/image/shard-000000.tar ...   samples: __key__ "image-000042", png, txt, json
    out_dir/video/shard-000000.tar ...   samples: __key__ "video-000007", mp4, txt, json
    out_dir/audio/shard-000000.tar ...   samples: __key__ "audio-000003", flac (or wav), txt, json
    out_dir/manifest.json                counts, shards with sizes, the config

The `json` of a sample holds the ground-truth attributes its caption states (object colours,
centres, per-frame positions, note names, frequencies, onsets, tempo, ...) plus modality, seed
and index, so evaluation can check caption-following from pixels and samples alone.

    from selfflow.data.synth import SynthConfig, synth
    manifest = synth(SynthConfig(out_dir="data/synth/raw", num_images=200))
"""

import dataclasses
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from webdataset import TarWriter

from selfflow.data import synth_audio, synth_visual
from selfflow.progress import progress

MODALITY_IDS = {"image": 0, "video": 1, "audio": 2}  # part of every item's seed: never renumber


@dataclass
class SynthConfig:
    out_dir: str = "data/synth/raw"
    seed: int = 0
    num_images: int = 1024
    num_videos: int = 256
    num_audio: int = 512
    image_size: int = 32  # pixels, square
    video_frames: int = 9  # 4n + 1 suits Wan-style causal video VAEs
    video_size: int = 32  # pixels, square, even (yuv420p)
    fps: int = 8
    audio_seconds: float = 1.0
    sample_rate: int = 16000
    audio_channels: int = 1  # 1 or 2; stereo carries the same signal on both channels
    audio_format: str = "flac"  # "flac" or "wav"
    samples_per_shard: int = 256

    def __post_init__(self):
        if not self.out_dir:
            raise ValueError("out_dir must not be empty")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name in ("num_images", "num_videos", "num_audio"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # below 24 pixels a small triangle is a few pixels and no longer reads as one
        if self.image_size < 24:
            raise ValueError(f"image_size must be >= 24, got {self.image_size}")
        if self.video_size < 32 or self.video_size % 2:
            raise ValueError(f"video_size must be even (yuv420p) and >= 32, got {self.video_size}")
        if self.video_frames < 2:
            raise ValueError(f"video_frames must be >= 2, got {self.video_frames}")
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")
        if not 0.25 <= self.audio_seconds <= 60:
            raise ValueError(f"audio_seconds must lie in [0.25, 60], got {self.audio_seconds}")
        if not 8000 <= self.sample_rate <= 192000:
            raise ValueError(f"sample_rate must lie in [8000, 192000], got {self.sample_rate}")
        if self.audio_channels not in (1, 2):
            raise ValueError(f"audio_channels must be 1 or 2, got {self.audio_channels}")
        if self.audio_format not in ("flac", "wav"):
            raise ValueError(f"audio_format must be 'flac' or 'wav', got {self.audio_format!r}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")

    def counts(self) -> dict[str, int]:
        return {"image": self.num_images, "video": self.num_videos, "audio": self.num_audio}


def item_rng(seed: int, modality: str, index: int) -> np.random.Generator:
    """The generator of one item: a function of (seed, modality, index) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, MODALITY_IDS[modality], index]))


def make_sample(cfg: SynthConfig, modality: str, index: int, video_codec: str) -> dict[str, bytes | str]:
    """One webdataset sample: `__key__`, the media bytes, `txt` (caption) and `json` (attributes)."""
    rng = item_rng(cfg.seed, modality, index)
    if modality == "image":
        scene = synth_visual.sample_image_scene(rng, cfg.image_size)
        media = {"png": synth_visual.encode_png(synth_visual.render_image(scene, cfg.image_size))}
        caption, attrs = synth_visual.image_caption(scene), dataclasses.asdict(scene)
        attrs["image_size"] = cfg.image_size
    elif modality == "video":
        scene = synth_visual.sample_video_scene(rng, cfg.video_size, cfg.video_frames)
        frames = synth_visual.render_video(scene, cfg.video_size)
        media = {"mp4": synth_visual.encode_mp4(frames, cfg.fps, video_codec)}
        caption, attrs = synth_visual.video_caption(scene), dataclasses.asdict(scene)
        attrs.update(frames=cfg.video_frames, fps=cfg.fps, video_size=cfg.video_size, codec=video_codec)
    elif modality == "audio":
        clip = synth_audio.sample_audio_clip(rng, cfg.audio_seconds)
        pcm = synth_audio.render_audio(clip, cfg.sample_rate, cfg.audio_channels)
        media = {cfg.audio_format: synth_audio.encode_audio(pcm, cfg.sample_rate, cfg.audio_format)}
        caption, attrs = synth_audio.audio_caption(clip), dataclasses.asdict(clip)
        attrs.update(sample_rate=cfg.sample_rate, channels=cfg.audio_channels)
    else:
        raise ValueError(f"unknown modality {modality!r}")
    meta = {"modality": modality, "seed": cfg.seed, "index": index, **attrs}
    return {
        "__key__": f"{modality}-{index:06d}",
        **media,
        "txt": caption.encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def write_shards(cfg: SynthConfig, modality: str, video_codec: str, bar: tqdm) -> list[dict]:
    """Write `out_dir/<modality>/shard-%06d.tar`; returns one `{path, samples, bytes}` per shard."""
    root = Path(cfg.out_dir)
    folder = root / modality
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("shard-*.tar"):  # a previous, larger run must not leave extra shards behind
        stale.unlink()
    count, per = cfg.counts()[modality], cfg.samples_per_shard
    shards = []
    for shard, start in enumerate(range(0, count, per)):
        path = folder / f"shard-{shard:06d}.tar"
        with open(path, "wb") as f:
            # mtime=0 and a fixed tar format make the archive a function of its samples
            writer = TarWriter(f, encoder=False, mtime=0, format=tarfile.USTAR_FORMAT)
            for index in range(start, min(start + per, count)):
                writer.write(make_sample(cfg, modality, index, video_codec))
                bar.update()
            writer.close()
        rel = path.relative_to(root).as_posix()
        shards.append({"path": rel, "samples": min(per, count - start), "bytes": path.stat().st_size})
    return shards


def synth(cfg: SynthConfig) -> dict:
    """Generate the dataset described by `cfg` under `cfg.out_dir`; returns (and writes) the manifest."""
    video_codec = synth_visual.pick_video_codec()
    counts = cfg.counts()
    manifest = {"config": dataclasses.asdict(cfg), "video_codec": video_codec, "modalities": {}}
    with progress(total=sum(counts.values()), desc="synth", unit="item") as bar:
        for modality, count in counts.items():
            bar.set_postfix_str(modality)
            shards = write_shards(cfg, modality, video_codec, bar)
            total = sum(s["bytes"] for s in shards)
            manifest["modalities"][modality] = {"count": count, "shards": shards, "bytes": total}
    manifest["bytes"] = sum(m["bytes"] for m in manifest["modalities"].values())
    path = Path(cfg.out_dir) / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
