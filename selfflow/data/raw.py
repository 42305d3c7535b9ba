"""Raw webdataset shards: samples read from a tar (damage detected), media members decoded to tensors in [-1, 1].

A sample is the run of consecutive tar members that share a key (the member name up to the first
dot of its basename, as webdataset groups them): `image-000042.png`, `image-000042.txt`,
`image-000042.json` -> `{"__key__": "image-000042", "png": ..., "txt": ..., "json": ...}`.

    for sample in read_shard("data/synth/raw/image/shard-000000.tar"):
        image = decode_image(sample["png"], channels=3)   # (3, H, W) float32 in [-1, 1]

A tar that ends early or holds garbage raises `ShardError` after the samples before the damage:
tarfile itself stops silently at a truncated or unreadable header, so `read_shard` also checks
that the archive ends with its two zero blocks. A shard given as a `pipe:` command (how
`data.loader.shard_list` names http(s) URLs: curl with timeouts, retries and a stall limit) is
first written to a temporary file; a command that fails is a `ShardError` naming the shard.
"""

import io
import shlex
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MEDIA_EXTENSIONS = {  # member extensions tried in order
    "image": ("png", "jpg", "jpeg", "webp"),
    "video": ("mp4", "webm", "mkv", "mov", "avi"),
    "audio": ("flac", "wav", "mp3", "ogg"),
}
IMAGE_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # PIL mode per channel count
END_OF_ARCHIVE = 1024  # two zero blocks of 512 bytes


class ShardError(Exception):
    """A tar shard that is truncated or corrupt."""


def split_name(name: str) -> tuple[str, str] | None:
    """`dir/key.ext.more` -> (`dir/key`, `ext.more` lower-cased); None for a name without an extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def shard_name(url: str | Path) -> str:
    """The file name of a shard, also of one fetched by a `pipe:` command (its last argument)."""
    text = str(url)
    return Path(shlex.split(text[5:])[-1] if text.startswith("pipe:") else text).name


@contextmanager
def local_copy(url: str | Path) -> Iterator[Path]:
    """A local path of shard `url`: the file itself, or a temporary file holding a `pipe:` command's output."""
    text = str(url)
    if not text.startswith("pipe:"):
        yield Path(url)
        return
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        done = subprocess.run(text[5:], shell=True, stdout=tmp, stderr=subprocess.PIPE, check=False)  # noqa: S602
        if done.returncode:
            why = done.stderr.decode(errors="replace").strip()[-300:]
            raise ShardError(f"{shard_name(url)}: fetching failed (exit {done.returncode}): {why}")
        tmp.flush()
        yield Path(tmp.name)


def read_shard(path: str | Path, wanted: set[str] | None = None) -> Iterator[dict]:
    """The samples of a tar in order (a local file or a `pipe:` command). Only members in `wanted` (None:
    all) are read; every key yields a sample. A `ShardError` after the last good sample if the archive
    is truncated or corrupt."""
    with local_copy(path) as local:
        yield from _read_tar(local, shard_name(path), wanted)


def _read_tar(path: Path, name: str, wanted: set[str] | None) -> Iterator[dict]:
    try:
        with tarfile.open(path, "r:") as tar:
            sample: dict | None = None
            for member in tar:
                parts = split_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key}
                if wanted is None or ext in wanted:
                    sample[ext] = tar.extractfile(member).read()
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            tail = f.read(END_OF_ARCHIVE)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"{name}: {err}") from err
    if len(tail) < END_OF_ARCHIVE or any(tail):
        raise ShardError(f"{name}: truncated or unreadable after byte {end}")
    if sample is not None:  # the last sample counts only once the archive is known to be whole
        yield sample


def find_media(sample: dict, modality: str) -> tuple[str, bytes] | None:
    """The first media member of `modality` in the sample as `(extension, bytes)`, or None."""
    for ext in MEDIA_EXTENSIONS[modality]:
        if sample.get(ext):
            return ext, sample[ext]
    return None


def decode_image(data: bytes, channels: int = 3) -> Tensor:
    """Encoded image -> `(C, H, W)` float32 in [-1, 1] (PIL; converted to L, RGB or RGBA)."""
    from PIL import Image

    if channels not in IMAGE_MODES:
        raise ValueError(f"image: cannot decode to {channels} channels (choose from {sorted(IMAGE_MODES)})")
    with Image.open(io.BytesIO(data)) as img:
        pixels = np.array(img.convert(IMAGE_MODES[channels]))  # a writable copy for torch
    pixels = pixels.reshape(*pixels.shape[:2], channels)
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def decode_video(data: bytes) -> Tensor:
    """Encoded video -> `(3, T, H, W)` float32 in [-1, 1], every frame in order (PyAV / FFmpeg, RGB).

    PyAV has wheels wherever users train (x86_64, aarch64 / Grace, macOS arm64); on the built-in
    videos its RGB frames equal decord's bit for bit (the earlier decoder; measured on 20 clips).
    """
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]  # (H, W, 3) uint8
    if not frames:
        raise ValueError("video has no frames")
    return torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1


def decode_audio(data: bytes, channels: int, sample_rate: int) -> Tensor:
    """Encoded audio -> `(channels, samples)` float32 at `sample_rate` (soundfile, torchaudio resampling).

    Mono to stereo duplicates the channel; any other count to mono averages the channels.
    """
    import soundfile as sf
    import torchaudio

    wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (samples, C)
    wave = torch.from_numpy(wave).T.contiguous()
    if wave.shape[0] != channels:
        if channels == 1:
            wave = wave.mean(dim=0, keepdim=True)
        elif wave.shape[0] == 1:
            wave = wave.expand(channels, -1).contiguous()
        else:
            raise ValueError(f"audio: cannot map {wave.shape[0]} channels to {channels}")
    if rate != sample_rate:
        wave = torchaudio.functional.resample(wave, orig_freq=rate, new_freq=sample_rate)
    return wave
