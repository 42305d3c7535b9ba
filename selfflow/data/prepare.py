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
"""

import json
import multiprocessing as mp
import os
import queue as queue_lib
import time
from collections import defaultdict
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from selfflow.config import save_config
from selfflow.data.prepare_worker import (
    CAPTION_CUT,
    DAMAGED_SHARD,
    TOKEN_DTYPES,
    ShardResult,
    ShardTask,
    WorkerSetup,
    encode_shard,
    init_worker,
)
from selfflow.data.raw import ShardError, read_shard
from selfflow.modalities.audio import compute_latent_stats, save_latent_stats
from selfflow.modalities.builder import ModalityConfig
from selfflow.modalities.text import SENTENCEPIECE_TYPES, SentencePieceTokenizer, TextConfig, train_sentencepiece
from selfflow.progress import progress

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
    """Encode every raw shard under `cfg.raw_dir` into latent shards under `cfg.out_dir`; returns the summary."""
    start = time.monotonic()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no GPU is visible")
    out = Path(cfg.out_dir)
    sources = {key: raw_shards(cfg.raw_dir, key) for key in cfg.modalities}
    counts, captions = scan_shards(sources, want_captions=cfg.text.kind == "sentencepiece")
    vocab = train_text(captions, cfg) if cfg.text.kind == "sentencepiece" else None
    for key in sources:
        (out / key).mkdir(parents=True, exist_ok=True)
        for stale in [*(out / key).glob("latent-*.tar"), *(out / key).glob("latent-*.tar.tmp")]:
            stale.unlink()  # a previous run with more shards must not leave extra ones behind
    modalities = dict(cfg.modalities)
    with worker_pool(cfg) as (pool, messages):
        for key, mcfg in modalities.items():
            if mcfg.autoencoder == "oobleck" and mcfg.stats is None:
                tasks = [ShardTask(key, mcfg, str(src), None) for src in sources[key]]
                results = run_tasks(pool, messages, tasks, counts[key], f"{key} latent stats")
                stats = compute_latent_stats(chunk[None] for r in results for chunk in r.latents)
                save_latent_stats(stats, out / key / "latent_stats.json")
                modalities[key] = replace(mcfg, stats=str(out / key / "latent_stats.json"))
        tasks = [
            ShardTask(key, modalities[key], str(src), str(out / key / f"latent-{i:06d}.tar"))
            for key in sources
            for i, src in enumerate(sources[key])
        ]
        results = run_tasks(pool, messages, tasks, sum(counts.values()), "prepare")
    by_key = {key: [r for r in results if r.task.key == key] for key in sources}
    summary = summarize(cfg, by_key, time.monotonic() - start)
    resolved = replace(cfg, modalities=modalities)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "manifest.json").write_text(json.dumps(manifest(resolved, by_key, vocab), indent=2) + "\n")
    save_config(resolved, out / "config.yaml")
    print_summary(summary)
    return summary


def raw_shards(raw_dir: str, key: str) -> list[Path]:
    folder = Path(raw_dir) / key
    urls = sorted(folder.glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"no raw shards (*.tar) in {folder} (drop the modality with modalities.{key}=null)")
    return urls


def scan_shards(sources: dict[str, list[Path]], want_captions: bool) -> tuple[dict[str, int], list[str]]:
    """Samples per modality (for the progress bars) and every caption, reading only the `txt` members."""
    counts, captions = defaultdict(int), []
    wanted = {"txt"} if want_captions else set()
    for key, urls in sources.items():
        for url in progress(urls, desc=f"scan {key}", unit="shard", leave=False):
            try:
                for sample in read_shard(url, wanted):
                    counts[key] += 1
                    try:
                        caption = sample.get("txt", b"").decode("utf-8").strip()
                    except UnicodeDecodeError:
                        continue  # skipped, with its reason, by the encoding pass
                    if caption:
                        captions.append(caption)
            except ShardError:
                pass  # reported by the encoding pass
    return counts, captions


def train_text(captions: list[str], cfg: PrepareConfig) -> int:
    """Train the sentencepiece model on all captions; returns its vocabulary size."""
    if not captions:
        raise ValueError(f"no captions (txt members) under {cfg.raw_dir} to train the sentencepiece model on")
    path = train_sentencepiece(captions, cfg.text.path, cfg.vocab_size, cfg.sentencepiece_type)
    return SentencePieceTokenizer(path, cfg.text.max_length).vocab_size


@contextmanager
def worker_pool(cfg: PrepareConfig):
    """A process pool whose workers import torch and the adapters once (forkserver preload) and a progress queue."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["selfflow.data.prepare_worker"])
    messages, counter = ctx.Queue(), ctx.Value("i", 0)
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    setup = WorkerSetup(cfg.text, cfg.dtype, cfg.batch_size, cfg.device, threads)
    pool = ProcessPoolExecutor(cfg.workers, ctx, initializer=init_worker, initargs=(setup, messages, counter))
    try:
        yield pool, messages
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_tasks(pool, messages, tasks: list[ShardTask], total: int, desc: str) -> list[ShardResult]:
    """Run shard tasks on the pool with a progress bar over samples; a worker's exception stops the run."""
    futures = [pool.submit(encode_shard, task) for task in tasks]
    shown: dict[str, int] = defaultdict(int)
    with progress(total=total, desc=desc, unit="sample") as bar:
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
