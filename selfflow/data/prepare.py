"""`selfflow prepare`: raw webdataset shards -> the latent shards that training reads.

    selfflow prepare --config configs/data/prepare_tiny.yaml workers=4
    summary = prepare(PrepareConfig(raw_dir="data/synth/raw", out_dir="data/synth/latents"))

1. Read every caption (only the `txt` members) and train the sentencepiece model on them
   (text kind "sentencepiece"; written to text.path, by default out_dir/text/spm.model).
2. An Oobleck audio VAE given no `stats` encodes its audio once unnormalised; the per-channel
   mean and std go to out_dir/<modality>/latent_stats.json and the real pass uses them.
3. Worker processes encode one shard each: raw_dir/<modality>/<i-th shard>.tar ->
   out_dir/<modality>/latent-<i>.tar, one output shard per input shard (a shard left with no
   usable sample is not written). Members per sample: see `selfflow.data.prepare_worker`.

Bad data never stops the run: a sample without media or caption, with undecodable media or an
unsupported shape, and a truncated or corrupt shard are skipped and counted by reason, with keys
(shard names for shards), in out_dir/summary.json. out_dir/manifest.json lists per modality the
token shape, shards and the adapter config, and the text setup; out_dir/config.yaml is the
resolved config.

Several processes (torchrun / srun, one per GPU: `device=cuda` gives each its `LOCAL_RANK`'s GPU)
split the work: process r encodes every world-th output shard (the shard names are the same as one
process writes), the captions of every process train one sentencepiece model on rank 0 in shard
order, the Oobleck statistics merge every process's float64 moments, and rank 0 writes
summary.json and manifest.json from everyone's results after they finished.

Resumable: every finished output shard has a marker (`latent-<i>.tar.done`, with its sha256 and a
fingerprint of its inputs and settings), so the same command after a crash or a kill keeps the
complete shards and encodes the rest; the sentencepiece model and the statistics are kept the same
way. Unfinished files, markers that no longer match and shards beyond the raw shard count are
replaced or removed.

    torchrun --nproc-per-node 8 -m selfflow.cli prepare --config configs/data/prepare_flux2.yaml device=cuda
"""

import hashlib
import json
import multiprocessing as mp
import os
import queue as queue_lib
import re
import time
from collections import defaultdict
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from selfflow.config import save_config
from selfflow.data.loader import shard_list
from selfflow.data.prepare_worker import (
    CAPTION_CUT,
    DAMAGED_SHARD,
    TOKEN_DTYPES,
    ShardResult,
    ShardTask,
    WorkerSetup,
    encode_shard,
    init_worker,
    read_marker,
)
from selfflow.data.raw import ShardError, read_shard
from selfflow.files import atomic_write, file_sha256
from selfflow.modalities.audio import latent_moments, save_latent_stats, stats_from_moments
from selfflow.modalities.builder import ModalityConfig
from selfflow.modalities.text import SENTENCEPIECE_TYPES, SentencePieceTokenizer, TextConfig, train_sentencepiece
from selfflow.progress import progress
from selfflow.ranks import joined, rank_world, together

MAX_EXAMPLES = 10  # keys kept (and printed) per skip reason


def tiny_modalities() -> dict[str, ModalityConfig]:
    """Raw autoencoders for the `selfflow synth` defaults, cheap on a CPU.

    image 32x32, patch 2x2 -> 16x16 tokens of 12 channels; video 9 frames of 32x32, patch 1x8x8 ->
    9x4x4 tokens of 192 channels; audio 1 s of 16 kHz mono, 400 samples a token -> 40 tokens of 400.
    """
    return {
        "image": ModalityConfig("image", "raw", patch=[2, 2]),
        "video": ModalityConfig("video", "raw", patch=[1, 8, 8]),
        "audio": ModalityConfig("audio", "raw", patch=[400], channels=1, sample_rate=16000),
    }


def default_text() -> TextConfig:
    """A sentencepiece model trained here on the captions; `{out_dir}` is replaced by the output folder."""
    return TextConfig(kind="sentencepiece", path="{out_dir}/text/spm.model")


@dataclass
class PrepareConfig:
    raw_dir: str = "data/synth/raw"  # <modality>/*.tar raw webdataset shards (the `selfflow synth` layout)
    out_dir: str = "data/synth/latents"
    # key: the folder under raw_dir and out_dir; `modalities.video=null` drops one
    modalities: dict[str, ModalityConfig] = field(default_factory=tiny_modalities)
    text: TextConfig = field(default_factory=default_text)  # sentencepiece: trained here and written to text.path
    vocab_size: int = 256  # sentencepiece vocabulary (fewer pieces when the captions hold fewer)
    sentencepiece_type: str = "unigram"  # "unigram" | "bpe" | "word" (one piece a word: small closed vocabularies)
    dtype: str = "bf16"  # stored latent tokens: bf16 | fp16
    workers: int = 2  # worker processes, one shard per task
    batch_size: int = 16  # media per autoencoder call
    device: str = "cpu"  # cpu | cuda (workers take the visible GPUs in turn)
    # per modality, raw shards elsewhere instead of raw_dir/<modality>/*.tar: a glob, a brace pattern,
    # a `pipe:` command or http(s) URLs (`shards.image="https://host/raw/image-{000000..000999}.tar"`)
    shards: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.text.path:
            self.text.path = self.text.path.replace("{out_dir}", self.out_dir)
        if not self.raw_dir or not self.out_dir:
            raise ValueError("raw_dir and out_dir must not be empty")
        if not self.modalities:
            raise ValueError("modalities: at least one is needed")
        if "text" in self.modalities:
            raise ValueError("modalities: 'text' is the folder of the text model, name the modality otherwise")
        if self.dtype not in TOKEN_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(TOKEN_DTYPES)}, got {self.dtype!r}")
        if self.workers < 1 or self.batch_size < 1 or self.vocab_size < 8:
            raise ValueError("workers and batch_size must be >= 1 and vocab_size >= 8")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.sentencepiece_type not in SENTENCEPIECE_TYPES:
            raise ValueError(f"sentencepiece_type must be in {SENTENCEPIECE_TYPES}, not {self.sentencepiece_type!r}")


def prepare(cfg: PrepareConfig) -> dict:
    """Encode every raw shard under `cfg.raw_dir` into latent shards under `cfg.out_dir`; returns the
    summary. Under torchrun / srun each process takes every world-th shard (`prepare_share`)."""
    with joined("cpu") as (rank, world, _):  # gloo: only counts, captions and results cross processes
        return prepare_share(cfg, rank, world)


def prepare_share(cfg: PrepareConfig, rank: int, world: int) -> dict:
    """Process `rank` of `world` encodes its shards; captions, statistics and results are merged."""
    start = time.monotonic()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no GPU is visible")
    out = Path(cfg.out_dir)
    sources = {key: raw_shards(cfg, key) for key in cfg.modalities}
    order = [(key, i) for key in sources for i in range(len(sources[key]))]  # every output shard, in order
    place = {shard: n for n, shard in enumerate(order)}
    mine = order[rank::world]
    want = cfg.text.kind == "sentencepiece"
    scans = together(lambda: scan_shards({(k, i): sources[k][i] for k, i in mine}, want_captions=want))
    counts = scans[rank][0]
    vocab = None
    if want:  # one model from every caption in shard order, trained once (rank 0), as one process would
        by_shard = {shard: texts for _, part in scans for shard, texts in part.items()}
        captions = [c for shard in order for c in by_shard.get(shard, [])]
        together(lambda: train_text(captions, cfg) if rank == 0 else None)
        vocab = SentencePieceTokenizer(cfg.text.path, cfg.text.max_length).vocab_size
    together(lambda: clear_leftovers(out, {key: len(urls) for key, urls in sources.items()}) if rank == 0 else None)
    modalities = dict(cfg.modalities)
    device = f"cuda:{local_rank()}" if cfg.device == "cuda" and world > 1 else cfg.device  # one GPU a process
    with worker_pool(cfg, device) as (pool, messages):
        for key, mcfg in cfg.modalities.items():
            if mcfg.autoencoder == "oobleck" and mcfg.stats is None:
                mine_of_key = [sources[key][i] for k, i in mine if k == key]
                modalities[key] = audio_stats(pool, messages, key, mcfg, sources[key], mine_of_key, counts, out)
        text_sha = file_sha256(cfg.text.path) if want else None
        tasks = [
            ShardTask(
                key,
                modalities[key],
                str(sources[key][i]),
                str(out / key / f"latent-{i:06d}.tar"),
                place[key, i],
                shard_fingerprint(sources[key][i], modalities[key], cfg, text_sha),
            )
            for key, i in mine
        ]
        parts = together(lambda: encode_share(pool, messages, tasks, counts, rank, world))
    results = sorted((r for part in parts for r in part), key=lambda r: r.task.index)
    by_key = {key: [r for r in results if r.task.key == key] for key in sources}
    reused = sum(1 for r in results if r.reused)
    summary = summarize(cfg, by_key, time.monotonic() - start) | {"processes": world, "reused_shards": reused}
    resolved = replace(cfg, modalities=modalities)

    def write() -> None:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "manifest.json").write_text(json.dumps(manifest(resolved, by_key, vocab), indent=2) + "\n")
        save_config(resolved, out / "config.yaml")
        print_summary(summary)

    together(lambda: write() if rank == 0 else None)  # every process returns after the manifest exists
    return summary


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def shard_identity(src: str) -> list:
    """A raw shard as fingerprints see it: a local file by path, size and mtime; a remote one by its URL."""
    path = Path(src)
    return [src, path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else [src]


def shard_fingerprint(src: str, modality: ModalityConfig, cfg: PrepareConfig, text_sha: str | None) -> str:
    """What an output shard depends on: the raw shard (`shard_identity`), the adapter, the text setup
    (and the sentencepiece model's sha256), the stored dtype. A marker with another fingerprint is stale."""
    inputs = {"src": shard_identity(src), "modality": asdict(modality)}
    inputs |= {"text": asdict(cfg.text), "text_sha256": text_sha, "dtype": cfg.dtype}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def clear_leftovers(out: Path, shards: dict[str, int]) -> None:
    """Unfinished files of an interrupted run and shards beyond this run's count (a previous run with more
    raw shards must not leave extra ones behind); finished shards stay for their markers to vouch for."""
    for key, count in shards.items():
        (out / key).mkdir(parents=True, exist_ok=True)
        for path in (out / key).glob("latent-*"):
            found = re.fullmatch(r"latent-(\d+)\.tar(\.done)?", path.name)
            if found is None or int(found.group(1)) >= count:
                path.unlink()


def audio_stats(pool, messages, key, mcfg, sources, mine, counts, out) -> ModalityConfig:
    """The Oobleck statistics pass: each process encodes its shards unnormalised, their float64
    moments are merged exactly, rank 0 writes `latent_stats.json`. Kept when an earlier run wrote it
    for the same shards and adapter (its marker's fingerprint matches)."""
    path = out / key / "latent_stats.json"
    inputs = {"shards": [shard_identity(p) for p in sources], "modality": asdict(mcfg)}
    fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    done = Path(f"{path}.done")
    if not (path.is_file() and done.is_file() and done.read_text().strip() == fingerprint):

        def moments():
            tasks = [ShardTask(key, mcfg, str(src), None) for src in mine]
            results = run_tasks(pool, messages, tasks, sum(counts[key, s] for s in mine), f"{key} latent stats")
            return latent_moments(chunk[None] for r in results for chunk in r.latents)

        def write(parts: list) -> None:
            save_latent_stats(stats_from_moments(parts), path)
            atomic_write(done, fingerprint + "\n")

        parts = together(moments)
        together(lambda: write(parts) if rank_world()[0] == 0 else None)
    return replace(mcfg, stats=str(path))


def encode_share(pool, messages, tasks: list[ShardTask], counts, rank: int, world: int) -> list[ShardResult]:
    """This process's shards: those an earlier run completed (`read_marker`) are kept, the rest encoded."""
    kept = {task.index: read_marker(task) for task in tasks}
    todo = [task for task in tasks if kept[task.index] is None]
    if rank == 0 and len(todo) < len(tasks):
        tqdm.write(f"prepare: {len(tasks) - len(todo)} of this process's shards are complete from an earlier run")
    total = sum(counts[task.key, task.src] for task in todo)
    desc = "prepare" if world == 1 else f"prepare (process 0 of {world})"
    done = {r.task.index: r for r in run_tasks(pool, messages, todo, total, desc, show=rank == 0)}
    for index, result in kept.items():
        if result is not None:
            result.reused = True
            done[index] = result
    return [done[task.index] for task in tasks]


def raw_shards(cfg: PrepareConfig, key: str) -> list[str]:
    """The raw shards of modality `key`: `cfg.shards[key]` (as training's loader reads shard lists) or
    raw_dir/<key>/*.tar."""
    if key in cfg.shards:
        return shard_list(cfg.shards[key])
    folder = Path(cfg.raw_dir) / key
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"no raw shards (*.tar) in {folder} (drop the modality with modalities.{key}=null)")
    return urls


def scan_shards(shards: dict[tuple[str, int], str], want_captions: bool) -> tuple[dict, dict]:
    """Samples per shard (for the progress bars) and each shard's captions, reading only the `txt` members."""
    counts, captions = defaultdict(int), defaultdict(list)
    wanted = {"txt"} if want_captions else set()
    for (key, i), url in progress(shards.items(), desc="scan", unit="shard", leave=False):
        try:
            for sample in read_shard(url, wanted):
                counts[key, url] += 1
                try:
                    caption = sample.get("txt", b"").decode("utf-8").strip()
                except UnicodeDecodeError:
                    continue  # skipped, with its reason, by the encoding pass
                if caption:
                    captions[key, i].append(caption)
        except ShardError:
            pass  # reported by the encoding pass
    return counts, captions


def train_text(captions: list[str], cfg: PrepareConfig) -> int:
    """Train the sentencepiece model on all captions (kept when an earlier run trained it on the same
    captions with the same settings); returns its vocabulary size."""
    if not captions:
        raise ValueError(f"no captions (txt members) under {cfg.raw_dir} to train the sentencepiece model on")
    inputs = {"captions": captions, "vocab_size": cfg.vocab_size, "type": cfg.sentencepiece_type}
    fingerprint = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
    done = Path(f"{cfg.text.path}.done")
    if not (Path(cfg.text.path).is_file() and done.is_file() and done.read_text().strip() == fingerprint):
        train_sentencepiece(captions, cfg.text.path, cfg.vocab_size, cfg.sentencepiece_type)
        atomic_write(done, fingerprint + "\n")
    return SentencePieceTokenizer(cfg.text.path, cfg.text.max_length).vocab_size


@contextmanager
def worker_pool(cfg: PrepareConfig, device: str):
    """A process pool whose workers import torch and the adapters once (forkserver preload) and a progress
    queue; `device`: "cpu", "cuda" (workers take the visible GPUs in turn) or one GPU ("cuda:1")."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["selfflow.data.prepare_worker"])
    messages, counter = ctx.Queue(), ctx.Value("i", 0)
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    setup = WorkerSetup(cfg.text, cfg.dtype, cfg.batch_size, device, threads)
    pool = ProcessPoolExecutor(cfg.workers, ctx, initializer=init_worker, initargs=(setup, messages, counter))
    try:
        yield pool, messages
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_tasks(pool, messages, tasks: list[ShardTask], total: int, desc: str, show: bool = True) -> list[ShardResult]:
    """Run shard tasks on the pool with a progress bar over samples; a worker's exception stops the run."""
    futures = [pool.submit(encode_shard, task) for task in tasks]
    shown: dict[str, int] = defaultdict(int)
    with progress(total=total, desc=desc, unit="sample", disable=not show) as bar:
        pending = futures
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            drain(messages, bar, shown)
            for future in done:
                future.result()  # re-raises a worker's exception
        drain(messages, bar, shown, wait_s=0.1)  # the last messages may trail the results
    return [future.result() for future in futures]


def drain(messages, bar: tqdm, shown: dict[str, int], wait_s: float = 0.0) -> None:
    """Apply queued worker messages `(samples done, skip reason, detail)` to the bar; print the first skips."""
    while True:
        try:
            done, reason, detail = messages.get(timeout=wait_s) if wait_s else messages.get_nowait()
        except queue_lib.Empty:
            return
        bar.update(done)
        if reason is not None:
            shown[reason] += 1
            if shown[reason] <= MAX_EXAMPLES:
                tqdm.write(f"{'written' if reason == CAPTION_CUT else 'skipped'} ({reason}) {detail}")


NOT_SKIPPED = (DAMAGED_SHARD, CAPTION_CUT)  # counted apart: shards, and samples written with a cut caption


def summarize(cfg: PrepareConfig, by_key: dict[str, list[ShardResult]], seconds: float) -> dict:
    """Written and skipped counts per modality, skip reasons with example keys (shard names for damaged shards)."""
    modalities = {}
    for key, results in by_key.items():
        reasons: dict[str, list[str]] = defaultdict(list)
        for r in results:
            for reason, keys in r.skipped.items():
                reasons[reason] += keys
        modalities[key] = {
            "written": sum(r.written for r in results),
            "skipped": sum(len(keys) for reason, keys in reasons.items() if reason not in NOT_SKIPPED),
            "captions_cut": len(reasons.get(CAPTION_CUT, [])),
            "damaged_shards": len(reasons.get(DAMAGED_SHARD, [])),
            "shards": sum(1 for r in results if r.written),
            "reasons": {
                reason: {"count": len(keys), "examples": keys[:MAX_EXAMPLES]}
                for reason, keys in sorted(reasons.items())
            },
        }
    return {"raw_dir": cfg.raw_dir, "out_dir": cfg.out_dir, "seconds": round(seconds, 2), "modalities": modalities}


def manifest(cfg: PrepareConfig, by_key: dict[str, list[ShardResult]], vocab: int | None) -> dict:
    """What training needs to know: token shapes, shards and adapter config per modality; the text setup."""
    out = Path(cfg.out_dir)
    modalities = {}
    for key, results in by_key.items():
        shapes: dict[tuple, int] = defaultdict(int)
        for r in results:
            for shape, n in r.shapes.items():
                shapes[shape] += n
        latent_shape, tokens, token_dim = max(shapes, key=shapes.get) if shapes else (None, None, None)
        modalities[key] = {
            "count": sum(r.written for r in results),
            "token_dim": token_dim,
            "tokens": tokens,  # L of the most common shape
            "latent_shape": list(latent_shape) if latent_shape else None,
            "shapes": [
                {"latent_shape": list(s), "tokens": L, "token_dim": C, "count": n}
                for (s, L, C), n in sorted(shapes.items(), key=lambda kv: -kv[1])
            ],
            "dtype": cfg.dtype,
            "shards": [
                {"path": Path(r.task.dst).relative_to(out).as_posix(), "samples": r.written, "bytes": r.bytes}
                for r in results
                if r.written
            ],
            "modality": asdict(cfg.modalities[key]),
        }
    text_dims = {r.text_dim for results in by_key.values() for r in results if r.text_dim}
    text = {"config": asdict(cfg.text), "vocab_size": vocab, "dim": max(text_dims) if text_dims else None}
    return {"raw_dir": cfg.raw_dir, "modalities": modalities, "text": text}


def print_summary(summary: dict) -> None:
    for key, m in summary["modalities"].items():
        damaged = f", {m['damaged_shards']} damaged shard(s)" if m["damaged_shards"] else ""
        print(f"{key}: {m['written']} written to {m['shards']} shard(s), {m['skipped']} skipped{damaged}")
        for reason, r in m["reasons"].items():
            more = ", ..." if r["count"] > len(r["examples"]) else ""
            print(f"  {reason}: {r['count']} ({', '.join(r['examples'])}{more})")
    print(f"wrote {summary['out_dir']} in {summary['seconds']:.1f} s")
