"""Training loader: endless, shuffled webdataset streams of latent tokens, one per modality.

Reads the latent shards that `selfflow prepare` writes (`latent.pth` = tokens, ids and latent
shape; `text.pth` = text token ids or embeddings with a mask; `json` = metadata with a class
label). Shards are split between ranks and DataLoader workers strictly when there are enough of
them (`EpochShards`: each epoch a seeded permutation dealt out so no two readers share a shard) or,
for small corpora, resampled (each rank and worker draws its own sequence with replacement, seeded
by `(seed, rank)`); either way streams never run dry. Each stream shuffles samples in a buffer
and batches samples of one token shape together (bucketing by resolution / frame count /
duration). A corrupt sample or shard is skipped, counted and
reported with its key; the run goes on, unless `max_bad_samples` samples or shards in a row are
bad (a folder of corrupt data): then the stream stops with an error naming the folder instead
of searching forever.

The position of a stream is the number of batches it has delivered; a resumed run rebuilds
the stream with the same seed, rank and number of ranks and skips that many batches, so it sees
the same data (at another number of ranks the strict split deals the shards out differently).

    stream = LatentStream(LoaderConfig("data/synth/latents/image"), batch_size=8, seed=0, rank=0)
    batch = next(stream)      # LatentBatch(x0, ids, text, text_mask, labels, keys)
"""

import glob
import io
import itertools
import json
import random
import shlex
import urllib.request
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from selfflow.data.batch import LatentBatch, mix_seed, stack_text
from selfflow.modalities.builder import ModalityConfig

SPLITS = ("auto", "strict", "resample")


@dataclass
class LoaderConfig:
    shards: str  # folder of latent shards (*.tar) or a glob
    shuffle_buffer: int = 256
    workers: int = 0  # DataLoader worker processes (0: read in the training process)
    max_bad_samples: int = 100  # unknown in any reference; chosen as far above a few damaged items in a row
    # "strict": every epoch one seeded permutation of the shards, dealt out to ranks and workers, so no
    # two read the same shard in an epoch; "resample": each rank and worker draws shards with replacement
    # (any number of shards, for small corpora); "auto": strict when there are at least ranks x workers
    # shards (webdataset's two modes: split_by_node / split_by_worker, and ResampledShards)
    split: str = "auto"

    def __post_init__(self):
        if self.shuffle_buffer < 1 or self.workers < 0 or self.max_bad_samples < 1:
            raise ValueError("shuffle_buffer and max_bad_samples must be >= 1 and workers >= 0")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")


class BadDataError(ValueError):
    """Too many corrupt samples or shards in a row: the folder is not usable as it is."""


class SkipCounter:
    """Counts and reports skipped samples/shards (per process); stops after `limit` in a row."""

    def __init__(self, where: str, limit: int):
        self.where, self.limit = where, limit
        self.counts: dict[str, int] = defaultdict(int)
        self.in_a_row = 0

    def __call__(self, exn: Exception) -> bool:  # webdataset handler: log and continue
        self.counts[type(exn).__name__] += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise BadDataError(
                f"{self.in_a_row} corrupt samples or shards in a row in {self.where} "
                f"(the last: {type(exn).__name__}: {exn}); stopping instead of searching on"
            )
        warnings.warn(f"skipped corrupt data: {type(exn).__name__}: {exn}", stacklevel=2)
        return True

    def good(self, sample: dict) -> dict:
        self.in_a_row = 0
        return sample


REMOTE = ("http://", "https://")
# A shard fetched over HTTP: a few retries, then the shard fails (skipped and counted by the stream's
# handler), never a hang: a transfer slower than 1 KiB/s for 60 s is abandoned (webdataset's own curl
# call retries for minutes and has no stall limit). Values unknown in any reference, chosen so.
CURL = (
    "curl --fail --silent --show-error --location --connect-timeout 10 --retry 3 --retry-delay 1 "
    "--speed-limit 1024 --speed-time 60"
)


def shard_list(pattern: str) -> list[str]:
    """The shards of `pattern` as webdataset opens them: a local folder (its *.tar), a glob, a brace
    pattern (`shard-{000000..000999}.tar`), a `pipe:` command, or http(s) URLs (fetched with `CURL`)."""
    if pattern.startswith(("pipe:", *REMOTE)):
        urls = list(braceexpand.braceexpand(pattern))
        return [fetched(url) if url.startswith(REMOTE) else url for url in urls]
    path = Path(pattern)
    if path.is_dir():
        urls = sorted(glob.glob(str(path / "*.tar")))
    else:
        urls = sorted({url for part in braceexpand.braceexpand(pattern) for url in glob.glob(part)})
    if not urls:
        raise FileNotFoundError(f"no latent shards (*.tar) found at {pattern}")
    return urls


def fetched(url: str) -> str:
    """How an http(s) shard URL is opened: a `pipe:` through curl with `CURL`'s limits."""
    return f"pipe:{CURL} {shlex.quote(url)}"


def data_manifest(data_dir: str) -> dict:
    """The `manifest.json` of a `selfflow prepare` output folder, local or at an http(s) URL."""
    if data_dir.startswith(REMOTE):
        url = data_dir.rstrip("/") + "/manifest.json"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"cannot read {url}: {err}") from None
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {data_dir} (is it `selfflow prepare` output?)")
    return json.loads(path.read_text())


def has_modality(data_dir: str, name: str) -> bool:
    """Whether a prepared folder (local, or at an http(s) URL: per its manifest) holds modality `name`."""
    if data_dir.startswith(REMOTE):
        return bool(data_manifest(data_dir).get("modalities", {}).get(name, {}).get("shards"))
    return (Path(data_dir) / name).is_dir()


def modality_shards(data_dir: str, name: str) -> list[str]:
    """The latent shards of modality `name` of a prepared folder, in order: its `*.tar` locally; at an
    http(s) URL those its manifest lists, fetched through curl (`fetched`)."""
    if not data_dir.startswith(REMOTE):
        return shard_list(str(Path(data_dir) / name))
    entry = data_manifest(data_dir).get("modalities", {}).get(name)
    if not entry or not entry.get("shards"):
        raise ValueError(f"{data_dir}/manifest.json lists no shards of modality {name!r}")
    return [fetched(f"{data_dir.rstrip('/')}/{shard['path']}") for shard in entry["shards"]]


def read_manifest(shards: str) -> tuple[str, dict] | None:
    """(where, content) of the `manifest.json` of `selfflow prepare` that holds the shard folder, glob,
    brace pattern or URL pattern `shards` (it sits beside the modality folders); None if there is none."""
    if shards.startswith(REMOTE):
        base = shards.split("{")[0].rsplit("/", 2)[0]  # .../latents/image/latent-{...}.tar -> .../latents
        try:
            return f"{base}/manifest.json", data_manifest(base)
        except FileNotFoundError:
            return None
    path = Path(shards)
    folder = path if path.is_dir() else path.parent
    manifest = folder.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        content = json.loads(manifest.read_text())
    except ValueError as err:
        raise ValueError(f"{manifest}: not a `selfflow prepare` manifest ({err})") from err
    if not isinstance(content, dict):
        raise ValueError(f"{manifest}: not a `selfflow prepare` manifest (a {type(content).__name__})")
    return str(manifest), content


def prepared_modality(shards: str, name: str) -> ModalityConfig:
    """The adapter config `selfflow prepare` used for modality `name` of the shards at `shards` (a local
    folder, glob or brace pattern, or http(s) URLs: the manifest is read beside the modality's folder)."""
    found = read_manifest(shards)
    if found is None:
        raise FileNotFoundError(
            f"no manifest.json beside {shards}: the autoencoder of these shards is unknown (is it `selfflow "
            f"prepare` output? to train without one, set modalities.{name}.timesteps.distribution explicitly)"
        )
    where, manifest = found
    entry = manifest.get("modalities", {}).get(name)
    if entry is None or "modality" not in entry:
        raise ValueError(f"{where} records no modality {name!r}")
    return ModalityConfig(**entry["modality"])


def decode_sample(sample: dict) -> dict:
    """Raw tar members -> tensors; a sample with missing or undecodable members raises (and is skipped)."""
    key = sample.get("__key__", "?")
    if "latent.pth" not in sample:
        raise ValueError(f"sample {key} has no latent.pth")
    try:
        latent = torch.load(io.BytesIO(sample["latent.pth"]), map_location="cpu", weights_only=True)
        text = torch.load(io.BytesIO(sample["text.pth"]), weights_only=True) if "text.pth" in sample else None
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except Exception as err:
        raise ValueError(f"sample {key} cannot be decoded: {err}") from err
    return {"key": key, "latent": latent, "text": text, "label": int(meta.get("label", -1))}


class _Batcher:
    """Groups samples by token shape and emits full batches of one shape."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, samples: Iterator[dict]) -> Iterator[LatentBatch]:
        buckets: dict[tuple, list[dict]] = defaultdict(list)
        for sample in samples:
            tokens = sample["latent"]["tokens"]
            text = sample["text"]
            shape = (tuple(tokens.shape), None if text is None else tuple(text["ids"].shape))
            bucket = buckets[shape]
            bucket.append(sample)
            if len(bucket) == self.batch_size:
                yield collate(bucket)
                buckets[shape] = []


def collate(samples: list[dict]) -> LatentBatch:
    x0 = torch.stack([s["latent"]["tokens"] for s in samples]).float()
    ids = torch.stack([s["latent"]["ids"] for s in samples]).long()
    text, text_mask = stack_text(samples)
    labels = torch.tensor([s["label"] for s in samples])
    return LatentBatch(x0, ids, text, text_mask, labels, [s["key"] for s in samples])


class EpochShards(IterableDataset):
    """Endless epochs of the shards: in epoch e a permutation seeded by `(seed, e)`, the same on every
    rank, of which rank r of `world` takes every world-th shard and its DataLoader worker w of W every
    W-th of those: within an epoch no shard is read by two readers."""

    def __init__(self, urls: list[str], seed: int, rank: int, world: int):
        self.urls, self.seed, self.rank, self.world = urls, seed, rank, world

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for epoch in itertools.count():
            order = random.Random(mix_seed(self.seed, epoch)).sample(self.urls, len(self.urls))
            for url in order[self.rank :: self.world][worker::workers]:
                yield {"url": url}


def shard_source(
    urls: list[str], split: str, seed: int, rank: int, world: int, workers: int = 0, where: str = ""
) -> tuple[IterableDataset, str]:
    """The first stage of a webdataset pipeline over `urls` for rank `rank` of `world` (and `workers`
    DataLoader workers each), and which split it is: "strict" (`EpochShards`) or "resample"."""
    readers = world * max(1, workers)
    if split == "strict" and len(urls) < readers:
        raise ValueError(
            f"{where}: {len(urls)} shards cannot be split strictly between {world} ranks x "
            f"{max(1, workers)} workers: give more shards or split=resample"
        )
    if split == "strict" or (split == "auto" and len(urls) >= readers):
        return EpochShards(urls, mix_seed(seed, len(urls)), rank, world), "strict"
    return wds.ResampledShards(urls, seed=mix_seed(seed, rank, len(urls)), deterministic=True), "resample"


class LatentStream:
    """An endless iterator of `LatentBatch`es for one modality on rank `rank` of `world`."""

    def __init__(self, cfg: LoaderConfig, batch_size: int, seed: int, rank: int = 0, position: int = 0, world: int = 1):
        self.cfg, self.batch_size = cfg, batch_size
        self.urls = shard_list(cfg.shards)
        self.skipped = SkipCounter(cfg.shards, cfg.max_bad_samples)
        self.seed = mix_seed(seed, rank, len(self.urls))
        shards, self.split = shard_source(self.urls, cfg.split, seed, rank, world, cfg.workers, cfg.shards)
        pipeline = wds.DataPipeline(
            shards,
            wds.tarfile_to_samples(handler=self.skipped),
            wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=random.Random(self.seed)),
            wds.map(decode_sample, handler=self.skipped),
            wds.map(self.skipped.good),
            _Batcher(batch_size),
        )
        if cfg.workers:
            loader = wds.WebLoader(pipeline, batch_size=None, num_workers=cfg.workers)
            self._iter = iter(loader)
        else:
            self._iter = iter(pipeline)
        self.position = 0
        for _ in range(position):  # resume: the same stream, fast-forwarded
            next(self)

    def __iter__(self) -> "LatentStream":
        return self

    def __next__(self) -> LatentBatch:
        batch = next(self._iter)
        self.position += 1
        return batch
