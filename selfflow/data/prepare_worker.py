"""The worker side of `selfflow prepare`: one raw shard -> one latent shard, or latent statistics.

Runs in the worker processes that `selfflow.data.prepare` starts. `init_worker` sets a process up
once (threads, device, text encoder); the modality adapter is built on the worker's first shard
of a modality and kept for the next ones. Samples are decoded one at a time, grouped by media
shape and encoded `batch_size` at a time, so a shard of mixed sizes is written in a different
order than it was read. A sample that cannot be used is skipped with a reason; a damaged shard
keeps the samples read before the damage.

Every finished output shard gets a marker `latent-<i>.tar.done` (JSON: the shard's sha256, the
fingerprint of its inputs and settings, its counts), so a restarted `selfflow prepare` keeps the
shards an interrupted run completed (`read_marker`).

Each latent sample holds what `selfflow.data.loader` reads:

    latent.pth  {"tokens": (L, C) bf16|fp16, "ids": (L, 4) int64, "shape": [C_lat, ...] (no batch)}
    text.pth    {"ids": (L_txt,) int64 sentencepiece ids (0 = pad), "mask": (L_txt,) bool}
                or {"ids": (L_txt, D) float16 embeddings, "mask": ...} for t5 / causal_lm
    txt         the caption
    json        the raw attributes plus modality, latent_shape, caption and label (-1 unless the raw json has one)
"""

import io
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from webdataset import TarWriter

from selfflow.data.raw import ShardError, decode_audio, decode_image, decode_video, find_media, read_shard
from selfflow.faults import fault_point
from selfflow.files import atomic_write, file_sha256
from selfflow.modalities.base import Modality
from selfflow.modalities.builder import ModalityConfig, build_modality
from selfflow.modalities.text import HFTextEncoder, SentencePieceTokenizer, TextConfig

TOKEN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DAMAGED_SHARD = "damaged shard"
CAPTION_TOO_LONG = "caption longer than text.max_length"  # the sample is skipped
CAPTION_CUT = "caption cut to text.max_length"  # text.truncate=true: written with the cut caption, counted


@dataclass
class WorkerSetup:
    """What every worker process needs, fixed for the whole run."""

    text: TextConfig
    dtype: str  # stored token dtype, a key of TOKEN_DTYPES
    batch_size: int
    device: str  # "cpu" or "cuda" (workers take the visible GPUs in turn)
    threads: int  # torch CPU threads per worker


@dataclass
class ShardTask:
    key: str  # the modality's folder name under raw_dir and out_dir
    modality: ModalityConfig
    src: str  # raw shard
    dst: str | None  # latent shard to write; None: return the latents for statistics instead
    index: int = 0  # the shard's place among all output shards of the run (names fault points)
    fingerprint: str = ""  # what the output depends on (`prepare.shard_fingerprint`), kept in its marker


@dataclass
class ShardResult:
    task: ShardTask
    written: int = 0
    bytes: int = 0
    shapes: dict[tuple, int] = field(default_factory=lambda: defaultdict(int))  # (latent shape, L, C) -> samples
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> keys / shard names
    text_dim: int | None = None  # t5 / causal_lm embedding width
    latents: list[Tensor] = field(default_factory=list)  # statistics pass: (C, N) chunks
    reused: bool = False  # complete from an earlier run (its marker), not encoded again


class Item(NamedTuple):
    key: str
    media: Tensor  # (C, H, W) | (C, T, H, W) | (C, samples) in [-1, 1]
    caption: str
    meta: dict[str, Any]


class SampleError(Exception):
    """A raw sample that cannot be used; `reason` is its category in the summary."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Worker:
    """One process's state: set up by `init_worker`, adapters built on demand and kept."""

    setup: WorkerSetup
    queue: Any  # multiprocessing queue of progress messages (samples done, skip reason, key)
    device: str
    text: SentencePieceTokenizer | HFTextEncoder | None
    modality_cfg: ModalityConfig | None = None
    modality: Modality | None = None

    def modality_for(self, cfg: ModalityConfig) -> Modality:
        if cfg != self.modality_cfg:
            self.modality = None  # let the previous autoencoder go before loading the next
            self.modality = build_modality(cfg).to(self.device)
            self.modality_cfg = cfg
        return self.modality

    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor] | None:
        """(ids or embeddings, mask, each caption's full token count) on the CPU, or None without text."""
        if self.text is None:
            return None
        if isinstance(self.text, SentencePieceTokenizer):
            return tuple(self.text(captions))
        emb, mask, lengths = self.text.encode(captions)
        return emb.to("cpu", torch.float16), mask.cpu(), lengths

    def report(self, done: int, reason: str | None = None, detail: str | None = None) -> None:
        self.queue.put((done, reason, detail))


_worker: Worker | None = None


def init_worker(setup: WorkerSetup, queue, counter) -> None:
    """Process initializer: threads, this worker's device (GPUs in turn by start order), the text encoder."""
    global _worker
    torch.set_num_threads(setup.threads)
    device = setup.device
    if device == "cuda":
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        device = f"cuda:{index % torch.cuda.device_count()}"
    if setup.text.kind == "sentencepiece":
        text = SentencePieceTokenizer(setup.text.path, setup.text.max_length)
    elif setup.text.kind in ("t5", "causal_lm"):
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        text = HFTextEncoder(setup.text, device, dtype)
    else:
        text = None
    _worker = Worker(setup, queue, device, text)


@torch.inference_mode()
def encode_shard(task: ShardTask) -> ShardResult:
    """Decode, encode and write one shard (or collect its latents when `task.dst` is None)."""
    worker = _worker
    modality = worker.modality_for(task.modality)
    result = ShardResult(task)
    tmp = Path(f"{task.dst}.tmp") if task.dst else None
    writer = TarWriter(str(tmp), encoder=False, mtime=0) if tmp else None
    try:
        for items in same_shape_batches(worker, modality, task.src, result):
            encode_batch(worker, modality, items, result, writer)
    finally:
        if writer is not None:
            writer.close()
    if tmp is not None and result.written:
        tmp.replace(task.dst)
        result.bytes = Path(task.dst).stat().st_size
    elif tmp is not None:
        tmp.unlink()  # nothing usable: no empty shard for the loader to spin on
    if task.dst is not None:
        write_marker(task, result)
        fault_point("prepare.shard_done", task.index)
    return result


def marker_path(dst: str) -> Path:
    return Path(f"{dst}.done")


def write_marker(task: ShardTask, result: ShardResult) -> None:
    """Seal an output shard: its sha256, the task's fingerprint and what the summary needs, written
    after the shard (a shard with no usable sample has a marker and no file)."""
    record = {
        "fingerprint": task.fingerprint,
        "sha256": file_sha256(task.dst) if result.written else None,
        "written": result.written,
        "bytes": result.bytes,
        "shapes": [[list(shape), tokens, dim, n] for (shape, tokens, dim), n in result.shapes.items()],
        "skipped": result.skipped,
        "text_dim": result.text_dim,
    }
    atomic_write(marker_path(task.dst), json.dumps(record))


def read_marker(task: ShardTask) -> ShardResult | None:
    """The recorded result of a shard an earlier run completed for the same inputs and settings (its
    marker's fingerprint matches and the shard's sha256 is the sealed one); None: encode it."""
    try:
        record = json.loads(marker_path(task.dst).read_text())
        if record.get("fingerprint") != task.fingerprint:
            return None
        if record["written"] and file_sha256(task.dst) != record["sha256"]:
            return None
        if not record["written"] and Path(task.dst).exists():
            return None
        shapes = defaultdict(int, {(tuple(shape), tokens, dim): n for shape, tokens, dim, n in record["shapes"]})
        skipped = defaultdict(list, record["skipped"])
        return ShardResult(task, record["written"], record["bytes"], shapes, skipped, record["text_dim"])
    except (OSError, ValueError, KeyError, TypeError):  # no marker, a damaged one, a missing shard
        return None


def same_shape_batches(worker: Worker, modality: Modality, src: str, result: ShardResult) -> Iterator[list[Item]]:
    """Usable samples of a shard in batches of one media shape; skipped samples are recorded in `result`."""
    need_caption = worker.setup.text.kind != "none"
    buckets: dict[tuple, list[Item]] = defaultdict(list)
    try:
        for sample in read_shard(src):
            try:
                item = to_item(sample, modality, need_caption)
            except SampleError as skip:
                result.skipped[skip.reason].append(sample["__key__"])
                worker.report(1, skip.reason, f"{sample['__key__']}: {skip}")
                continue
            bucket = buckets[tuple(item.media.shape)]
            bucket.append(item)
            if len(bucket) == worker.setup.batch_size:
                yield bucket
                buckets[tuple(item.media.shape)] = []
    except ShardError as err:  # keep what was read before the damage
        result.skipped[DAMAGED_SHARD].append(str(err))
        worker.report(0, DAMAGED_SHARD, str(err))
    yield from (bucket for bucket in buckets.values() if bucket)


def encode_batch(worker: Worker, modality: Modality, items: list[Item], result: ShardResult, writer) -> None:
    """Encode same-shape media together; write each sample (or keep its latent for statistics)."""
    media = torch.stack([it.media for it in items]).to(worker.device)
    latent = modality.encode(media).float()
    finite = torch.isfinite(latent.flatten(1)).all(dim=1).tolist()
    for item, ok in zip(items, finite, strict=True):
        if not ok:
            result.skipped["non-finite latent"].append(item.key)
            worker.report(1, "non-finite latent", item.key)
    keep = [i for i, ok in enumerate(finite) if ok]
    text = worker.encode_text([it.caption for it in items]) if writer is not None else None
    if text is not None:  # a caption longer than text.max_length: skipped, or cut and counted (text.truncate)
        limit = worker.setup.text.max_length
        for i in [i for i in keep if int(text[2][i]) > limit]:
            reason = CAPTION_CUT if worker.setup.text.truncate else CAPTION_TOO_LONG
            result.skipped[reason].append(items[i].key)
            worker.report(0, reason, f"{items[i].key}: {int(text[2][i])} tokens > {limit}")
            if not worker.setup.text.truncate:
                keep.remove(i)
    if not keep:
        return
    if writer is None:
        result.latents.append(latent[keep].transpose(0, 1).reshape(latent.shape[1], -1).cpu())  # (C, N)
        worker.report(len(keep))
        return
    tokens, ids = modality.tokenize(latent)  # (B, L, C), (B, L, 4)
    shape = list(latent.shape[1:])
    dtype = TOKEN_DTYPES[worker.setup.dtype]
    for i in keep:
        txt = None if text is None else (text[0][i], text[1][i])
        writer.write(latent_sample(items[i], tokens[i], ids[i], txt, shape, dtype, modality.name))
        result.shapes[(tuple(shape), tokens.shape[1], tokens.shape[2])] += 1
    result.written += len(keep)
    if text is not None and text[0].is_floating_point():
        result.text_dim = text[0].shape[-1]
    worker.report(len(keep))


def latent_sample(
    item: Item,
    tokens: Tensor,
    ids: Tensor,
    text: tuple[Tensor, Tensor] | None,
    shape: list[int],
    dtype: torch.dtype,
    name: str,
) -> dict[str, Any]:
    """The tar members of one latent sample; tensors are copied so none is saved with its batch's storage."""
    latent = {"tokens": tokens.to("cpu", dtype, copy=True), "ids": ids.to("cpu", copy=True), "shape": shape}
    label = item.meta.get("label")
    meta = {
        **item.meta,
        "modality": name,
        "latent_shape": shape,
        "caption": item.caption,
        "label": label if isinstance(label, int) and not isinstance(label, bool) else -1,
    }
    sample = {
        "__key__": item.key,
        "latent.pth": to_bytes(latent),
        "txt": item.caption.encode(),
        "json": json.dumps(meta).encode(),
    }
    if text is not None:
        sample["text.pth"] = to_bytes({"ids": text[0].to("cpu", copy=True), "mask": text[1].to("cpu", copy=True)})
    return sample


def to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def to_item(sample: dict, modality: Modality, need_caption: bool) -> Item:
    """A raw sample -> media tensor, caption and attributes; `SampleError` with a reason when it cannot be used."""
    found = find_media(sample, modality.name)
    if found is None:
        raise SampleError("missing media", f"no {modality.name} member")
    try:
        caption = sample["txt"].decode("utf-8").strip() if sample.get("txt") else ""
    except UnicodeDecodeError as err:
        raise SampleError("bad caption", str(err)) from None
    if need_caption and not caption:
        raise SampleError("missing caption")
    try:
        meta = json.loads(sample["json"]) if sample.get("json") else {}
    except ValueError as err:
        raise SampleError("bad json", str(err)) from None
    if not isinstance(meta, dict):
        raise SampleError("bad json", "not an object")
    try:
        media = decode_media(found[1], modality)
    except Exception as err:  # PIL, PyAV, soundfile and torchaudio each raise their own error types
        raise SampleError("undecodable media", f"{type(err).__name__}: {err}") from None
    try:
        modality.latent_shape((1, *media.shape))
    except ValueError as err:
        raise SampleError("unsupported shape", str(err)) from None
    return Item(sample["__key__"], media, caption, meta)


def decode_media(data: bytes, modality: Modality) -> Tensor:
    channels = modality.autoencoder.media_channels
    if modality.name == "image":
        return decode_image(data, channels)
    if modality.name == "video":
        return decode_video(data)
    wave = decode_audio(data, channels, modality.sample_rate)
    return wave[:, : wave.shape[1] // modality.hop * modality.hop]  # whole tokens only: drop the tail
