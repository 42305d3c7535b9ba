"""RT-1 TFRecord episodes -> webdataset clip shards for video-action training, plus action statistics.

    python -m selfflow.robotics.convert input=data/fractal20220817_data/0.1.0 out_dir=data/rt1/clips success_only=true
    (or --config PRESET.yaml first; the same keys as ConvertConfig)
    from selfflow.robotics.convert import ConvertConfig, convert
    summary = convert(ConvertConfig(input="data/fractal20220817_data/0.1.0", out_dir="data/rt1/clips"))

A clip is anchored at step t of an episode (3 Hz) and holds, with s = frame_stride,
C = context_frames, F = future_frames, H = action_horizon:

    ctx00.jpg .. ctx{C-1}.jpg   frames of steps t-(C-1)s, ..., t-s, t   (observed; ctx{C-1} is "now")
    fut00.jpg .. fut{F-1}.jpg   frames of steps t+s, ..., t+Fs          (to predict)
    actions.npy   float32 (H, 7): steps t .. t+H-1 of world_vector(3) + rotation_delta(3) + gripper(1)
    terminate.npy float32 (H, 3): terminate_episode one-hot of the same steps, kept apart because it is
                  a discrete flag, not a continuous command to normalise
    txt           the instruction
    json          episode id, source file and record, step t, the steps of every frame, success, metadata

Action a_t moves observation t to observation t+1, so the defaults F = H = 4 with s = 1 pair each
future frame with the action chunk that leads to it. Only anchors with every frame and action
inside the episode are written (no padding): t - (C-1)s >= 0, t + Fs <= T-1, t + H-1 <= T-1, and
t a multiple of clip_stride. Frames are stored as JPEG members: the release frames are copied
byte for byte (compact, no second JPEG loss), or decoded, resized to `resize` = [height, width]
(PIL bicubic) and re-encoded when asked.

out_dir also gets `stats.json` (per-dimension mean / std (population) / min / max / q01 / q99 of
the 7 action dimensions over every step of every kept episode, for normalisation) and
`summary.json` (episodes read / kept / filtered by reason, corrupt records with their files, clips
and shards written). Corrupt records (bad checksum, truncated file, undecodable episode or frame)
are skipped and counted; they never stop the run. The `__key__` of a clip is
"<episode>-<step:04d>" with episode "<file name, non-alphanumerics as _>_<record:05d>".
"""

import glob
import io
import json
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

from selfflow.progress import progress
from selfflow.ranks import joined, share, together
from selfflow.robotics.rt1 import CorruptRecordError, Episode, MalformedEpisodeError, parse_episode, read_tfrecord

ACTION_NAMES = (  # the 7 columns of actions.npy (TFDS fractal20220817_data action descriptions)
    "world_vector_x",
    "world_vector_y",
    "world_vector_z",
    "rotation_delta_roll",
    "rotation_delta_pitch",
    "rotation_delta_yaw",
    "gripper_closedness_action",
)
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class ConvertConfig:
    input: str = "data/fractal20220817_data/0.1.0"  # a folder of *.tfrecord* shards, a glob, or one file
    out_dir: str = "data/rt1/clips"
    context_frames: int = 1  # observed frames, the last one at the anchor step
    future_frames: int = 4  # frames after the anchor to predict
    frame_stride: int = 1  # steps between consecutive frames of a clip
    action_horizon: int = 4  # actions per chunk, one per step (3 Hz)
    clip_stride: int = 1  # steps between the anchors of consecutive clips of an episode
    resize: list[int] | None = None  # [height, width]; None keeps the release's 256x320 JPEGs untouched
    jpeg_quality: int = 95  # for re-encoded (resized or non-JPEG) frames
    success_only: bool = False  # keep only episodes whose aspects/success is true
    max_episodes: int | None = None  # stop after this many kept episodes
    samples_per_shard: int = 1000

    def __post_init__(self):
        if not self.input or not self.out_dir:
            raise ValueError("input and out_dir must not be empty")
        for name in ("context_frames", "frame_stride", "action_horizon", "clip_stride", "samples_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.future_frames < 0:
            raise ValueError(f"future_frames must be >= 0, got {self.future_frames}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise ValueError(f"resize must be [height, width] with both >= 1, got {self.resize}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if self.max_episodes is not None and self.max_episodes < 1:
            raise ValueError(f"max_episodes must be >= 1 or null, got {self.max_episodes}")


def find_shards(pattern: str) -> list[Path]:
    """The TFRecord files of `pattern`: a folder (its *.tfrecord* files), a glob, or one file; sorted."""
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.tfrecord*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"input {pattern!r}: no TFRecord files found")
    return files


def clip_anchors(num_steps: int, cfg: ConvertConfig) -> list[int]:
    """Anchor steps t whose context frames, future frames and action chunk all lie inside the episode."""
    first = (cfg.context_frames - 1) * cfg.frame_stride
    last = num_steps - 1 - max(cfg.future_frames * cfg.frame_stride, cfg.action_horizon - 1)
    return [t for t in range(first, last + 1) if t % cfg.clip_stride == 0]


def episode_id(path: Path, record: int) -> str:
    """A key-safe id (no dots, which would split a webdataset key) from the file name and record index."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', path.name)}_{record:05d}"


def action_matrix(episode: Episode) -> np.ndarray:
    """(T, 7) float32: world_vector, rotation_delta, gripper_closedness_action side by side."""
    a = episode.actions
    return np.concatenate([a["world_vector"], a["rotation_delta"], a["gripper_closedness_action"]], axis=1)


def encode_frames(frames: list[bytes], cfg: ConvertConfig) -> tuple[list[bytes], list[int]]:
    """The JPEG bytes of every frame and the (height, width) they have; raises OSError on an unreadable image."""
    out, size = [], None
    for data in frames:
        with Image.open(io.BytesIO(data)) as image:
            if cfg.resize is None and data.startswith(JPEG_MAGIC):
                out.append(data)  # the release frame as it is: no second JPEG loss
                size = [image.height, image.width]
                continue
            image = image.convert("RGB")
            if cfg.resize is not None:
                image = image.resize((cfg.resize[1], cfg.resize[0]), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=cfg.jpeg_quality)
            out.append(buffer.getvalue())
            size = [image.height, image.width]
    return out, size


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def clip_sample(cfg: ConvertConfig, t: int, episode: Episode, frames: list[bytes], actions: np.ndarray, source: dict):
    """One webdataset sample for the clip anchored at step t (see the module docstring). `source` (episode
    id, file, record, frame size) goes into the json member with the steps of every frame."""
    s, h = cfg.frame_stride, cfg.action_horizon
    context = [t - (cfg.context_frames - 1 - i) * s for i in range(cfg.context_frames)]
    future = [t + (i + 1) * s for i in range(cfg.future_frames)]
    meta = {
        **source,
        "step": t,
        "num_steps": episode.num_steps,
        "context_steps": context,
        "future_steps": future,
        "action_steps": list(range(t, t + h)),
        "success": episode.success,
        "instruction": episode.instruction,
        "metadata": episode.metadata,
    }
    sample = {"__key__": f"{source['episode']}-{t:04d}"}
    sample.update({f"ctx{i:02d}.jpg": frames[step] for i, step in enumerate(context)})
    sample.update({f"fut{i:02d}.jpg": frames[step] for i, step in enumerate(future)})
    sample["actions.npy"] = _npy(actions[t : t + h])
    sample["terminate.npy"] = _npy(episode.actions["terminate_episode"][t : t + h].astype(np.float32))
    sample["txt"] = episode.instruction.encode()
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    return sample


class ShardSink:
    """Writes samples to out_dir/<prefix>-%06d.tar, `per_shard` to a file (deterministic tar: mtime 0, USTAR)."""

    def __init__(self, out_dir: Path, per_shard: int, prefix: str = "shard"):
        self.out_dir, self.per_shard, self.prefix = out_dir, per_shard, prefix
        self.shards: list[dict] = []
        self._path, self._writer, self._count = None, None, 0

    def write(self, sample: dict) -> None:
        if self._writer is None or self._count == self.per_shard:
            self._finish()
            self._path = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
            # given a path string the writer owns (and closes) the file
            self._writer = TarWriter(str(self._path), encoder=False, mtime=0, format=tarfile.USTAR_FORMAT)
            self._count = 0
        self._writer.write(sample)
        self._count += 1

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self.shards.append({"path": self._path.name, "samples": self._count, "bytes": self._path.stat().st_size})
        self._writer = None

    def close(self) -> list[dict]:
        self._finish()
        return self.shards


def action_stats(actions: np.ndarray) -> dict:
    """Per-dimension statistics of (N, 7) actions, computed in float64; values are None when N = 0."""
    stats = {"names": list(ACTION_NAMES), "count": int(len(actions))}
    x = actions.astype(np.float64)
    for name, fn in [
        ("mean", lambda v: v.mean(0)),
        ("std", lambda v: v.std(0)),
        ("min", lambda v: v.min(0)),
        ("max", lambda v: v.max(0)),
        ("q01", lambda v: np.quantile(v, 0.01, axis=0)),
        ("q99", lambda v: np.quantile(v, 0.99, axis=0)),
    ]:
        stats[name] = fn(x).tolist() if len(x) else None
    return stats


def _records(path: Path, corrupt: list[CorruptRecordError]) -> Iterator[tuple[int, bytes]]:
    """(record index in the file, bytes) of the readable records; damage goes to `corrupt`."""
    before = len(corrupt)
    try:
        for n, record in enumerate(read_tfrecord(path, on_corrupt=corrupt.append)):
            yield n + len(corrupt) - before, record  # skipped records keep their place in the numbering
    except OSError as err:
        corrupt.append(CorruptRecordError(path, 0, None, f"unreadable file: {err}", recoverable=False))


def filter_reason(episode: Episode, num_anchors: int, cfg: ConvertConfig) -> str | None:
    """Why an episode is left out (a summary.json key), or None to keep it."""
    if cfg.success_only and episode.success is None:
        return "success_unknown"
    if cfg.success_only and not episode.success:
        return "not_success"
    if num_anchors == 0:
        return "too_short"
    return None


def convert(cfg: ConvertConfig) -> dict:
    """Convert the episodes of `cfg.input` into clip shards under `cfg.out_dir`; returns (and writes) the
    summary. Under torchrun / srun process r of W converts every W-th TFRecord file into its own shards
    (`shard-<r>-<i>.tar`; one process writes `shard-<i>.tar`), keeps its share of `max_episodes`, and
    rank 0 writes `stats.json` over every process's kept actions and `summary.json`."""
    with joined("cpu") as (rank, world, _):
        return convert_share(cfg, rank, world)


def convert_share(cfg: ConvertConfig, rank: int, world: int) -> dict:
    files = find_shards(cfg.input)
    out = Path(cfg.out_dir)

    def clear() -> None:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("shard-*.tar"):  # a previous, larger run must not leave extra shards behind
            stale.unlink()

    together(lambda: clear() if rank == 0 else None)
    limit = None if cfg.max_episodes is None else len(share(cfg.max_episodes, rank, world))
    parts = together(
        lambda: convert_files(cfg, files[rank::world], limit, "shard" if world == 1 else f"shard-{rank:04d}")
    )
    corrupt = [err for part in parts for err in part["corrupt"]]
    kept = [a for part in parts for a in part["actions"]]
    stats = action_stats(np.concatenate(kept) if kept else np.zeros((0, len(ACTION_NAMES))))
    summary = {
        "episodes_read": sum(part["episodes_read"] for part in parts),
        "episodes_kept": len(kept),
        "filtered": dict(sorted(sum((Counter(part["filtered"]) for part in parts), Counter()).items())),
        "corrupt_records": len(corrupt),
        "corrupt_by_file": dict(sorted(Counter(err["file"] for err in corrupt).items())),
        "corrupt": corrupt,
        "steps_converted": stats["count"],
        "clips_written": sum(part["clips"] for part in parts),
        "shards": [shard for part in parts for shard in part["shards"]],
        "files": [p.name for p in files],
        "processes": world,
        "config": asdict(cfg),
    }

    def write() -> None:
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    together(lambda: write() if rank == 0 else None)  # every process returns after the summary exists
    return summary


def convert_files(cfg: ConvertConfig, files: list[Path], limit: int | None, prefix: str) -> dict:
    """One process's files -> its shards; what the summary and the statistics need from them."""
    corrupt: list[CorruptRecordError] = []
    filtered: Counter[str] = Counter()
    kept_actions: list[np.ndarray] = []
    episodes_read = clips = 0
    sink = ShardSink(Path(cfg.out_dir), cfg.samples_per_shard, prefix)
    with progress(desc="rt1 convert", unit="episode") as bar:
        for path in files:
            if limit is not None and len(kept_actions) >= limit:
                break
            for index, record in _records(path, corrupt):
                written = _convert_record(cfg, path, index, record, sink, corrupt, filtered)
                if written is not None:
                    episodes_read += 1
                    clips += written[0]
                    if written[1] is not None:
                        kept_actions.append(written[1])
                bar.update()
                bar.set_postfix(clips=clips, corrupt=len(corrupt))
                if limit is not None and len(kept_actions) >= limit:
                    break
    return {
        "episodes_read": episodes_read,
        "actions": kept_actions,
        "filtered": dict(filtered),
        "corrupt": [err.as_dict() for err in corrupt],
        "clips": clips,
        "shards": sink.close(),
    }


def _convert_record(
    cfg: ConvertConfig,
    path: Path,
    index: int,
    record: bytes,
    sink: ShardSink,
    corrupt: list[CorruptRecordError],
    filtered: Counter,
) -> tuple[int, np.ndarray | None] | None:
    """Write the clips of one record: (clips written, its (T, 7) actions or None when filtered); None if corrupt."""
    try:
        episode = parse_episode(record)
    except MalformedEpisodeError as err:
        corrupt.append(CorruptRecordError(path, index, None, str(err), recoverable=True))
        return None
    anchors = clip_anchors(episode.num_steps, cfg)
    reason = filter_reason(episode, len(anchors), cfg)
    if reason is not None:
        filtered[reason] += 1
        return 0, None
    try:
        frames, frame_hw = encode_frames(episode.frames, cfg)
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        corrupt.append(CorruptRecordError(path, index, None, f"undecodable frame: {err}", recoverable=True))
        return None
    source = {"episode": episode_id(path, index), "file": path.name, "record": index, "frame_hw": frame_hw}
    actions = action_matrix(episode)
    for t in anchors:
        sink.write(clip_sample(cfg, t, episode, frames, actions, source))
    return len(anchors), actions


def main(argv: list[str] | None = None) -> int:
    """`python -m selfflow.robotics.convert [--config X.yaml] key=value ...`"""
    from selfflow.config import ConfigError, load_config, save_config

    args = sys.argv[1:] if argv is None else argv
    path = None
    if args[:1] == ["--config"]:
        if len(args) < 2:
            print("--config needs a file", file=sys.stderr)
            return 2
        path, args = args[1], args[2:]
    try:
        cfg = load_config(ConvertConfig, path, args)
        summary = convert(cfg)
        save_config(cfg, Path(cfg.out_dir) / "config.yaml")
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"rt1 convert: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{summary['clips_written']} clips from {summary['episodes_kept']}/{summary['episodes_read']} episodes "
        f"({summary['corrupt_records']} corrupt records skipped) -> {cfg.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
