"""Robot clips (the shards of `selfflow robotics convert`) as token batches for video-action training.

A clip's frames `ctx*.jpg` + `fut*.jpg` are resized to `frame_size`, tokenised by the raw video
modality (`patch` along (T, H, W), ids `(frame, h, w, 0)`), and split back into observed and
future tokens by frame index. Its action chunk `actions.npy` (H, 7) is normalised with the
dataset statistics (`stats.json`: `(a - mean) / std` per dimension) and becomes H tokens with ids
`(C - 1 + k, 0, 0, 0)`: action k is taken after observing frame C - 1 + k, on the frames' time
axis. Instructions become token ids through the sentencepiece model of `text` (the pretrained
trunk's own, so its learned text embedder keeps its meaning), or no text when `text.kind` is none.

The stream is endless, deterministic and streamed: shards are split between ranks as the
pretraining loader splits them (`data.loader.shard_source`: strictly when there are at least as
many shards as ranks, else resampled), clips pass a shuffle buffer of `shuffle_buffer` clips
(memory is bounded by the buffer, not by the dataset), and `position` (batches delivered, saved in
checkpoints) resumes it exactly: the raw clips before it are read again but not decoded. Shards are
local folders, globs, brace patterns, `pipe:` commands or http(s) URLs (`data.loader.shard_list`).

    stream = ClipStream(ClipDataConfig(shards="data/rt1/clips"), model_cfg, batch_size=8, seed=0)
    clip = stream.next_batch(device)   # a video_action.Clip
"""

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from selfflow.backbone.mmdit import MMDiTConfig
from selfflow.data.batch import mix_seed
from selfflow.data.loader import REMOTE, SPLITS, SkipCounter, shard_list, shard_source
from selfflow.modalities.builder import ModalityConfig, build_modality
from selfflow.modalities.text import SentencePieceTokenizer, TextConfig
from selfflow.robotics.video_action import Clip


@dataclass
class ClipDataConfig:
    shards: str = "data/rt1/clips"  # a folder of clip shards (`selfflow robotics convert` out_dir)
    stats: str | None = None  # action statistics; None: <shards>/stats.json
    frame_size: list[int] = field(default_factory=lambda: [32, 40])  # [H, W] the trunk sees
    patch: list[int] = field(default_factory=lambda: [1, 8, 8])  # raw video token patch (T, H, W)
    action_dim: int = 7  # world_vector 3 + rotation_delta 3 + gripper 1
    text: TextConfig = field(default_factory=TextConfig)  # sentencepiece of the pretrained trunk, or none
    # clips held for shuffling (the loader's memory); unknown in any reference, chosen as several
    # episodes' worth of RT-1 clips (about 40 a successful episode) at a few MB of JPEG frames
    shuffle_buffer: int = 512
    split: str = "auto"  # shards between ranks: "strict" | "resample" | "auto" (as `modalities.*.shard_split`)

    def __post_init__(self):
        if len(self.frame_size) != 2 or len(self.patch) != 3:
            raise ValueError(f"frame_size must be [H, W] and patch [T, H, W], got {self.frame_size}, {self.patch}")
        if self.patch[0] != 1:
            raise ValueError(f"patch must be [1, h, w] (one frame per token) so frames split by time, got {self.patch}")
        if any(s % p for s, p in zip(self.frame_size, self.patch[1:], strict=True)):
            raise ValueError(f"frame_size {self.frame_size} must be a multiple of the patch {self.patch[1:]}")
        if self.shuffle_buffer < 1 or self.split not in SPLITS:
            raise ValueError(f"shuffle_buffer must be >= 1 and split one of {SPLITS}")


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension action mean and std from a `stats.json`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"action statistics not found: {path} (written by `selfflow robotics convert`)")
    stats = json.loads(path.read_text())
    stats = stats.get("action", stats)
    mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    return mean, np.maximum(std, 1e-6)


def frame_tokens(video, frames: list, frame_size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pictures (PIL images or uint8 HWC arrays) -> raw video tokens `(1, L, C)` and ids `(1, L, 4)`."""
    h, w = frame_size
    pictures = [Image.fromarray(f) if isinstance(f, np.ndarray) else f for f in frames]
    arrays = [np.asarray(p.convert("RGB").resize((w, h), Image.BICUBIC)) for p in pictures]
    clip = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # (1, 3, T, H, W)
    return video.tokenize(video.encode(clip))


class ClipStream:
    def __init__(
        self, cfg: ClipDataConfig, model: MMDiTConfig, batch_size: int, seed: int, rank=0, position=0, world=1
    ):
        self.cfg, self.batch_size = cfg, batch_size
        self.video = build_modality(ModalityConfig("video", "raw", patch=list(cfg.patch)))
        if model.modalities["video"][0] != self.video.token_dim:
            raise ValueError(f"model.modalities.video {model.modalities['video']} != {self.video.token_dim} per token")
        if cfg.stats is None and cfg.shards.startswith(("pipe:", *REMOTE)):
            raise ValueError(f"data.stats: give the action statistics of remote clips {cfg.shards} as a local file")
        self.mean, self.std = load_stats(cfg.stats or Path(cfg.shards) / "stats.json")
        self.tokenizer = None
        if cfg.text.kind == "sentencepiece":
            self.tokenizer = SentencePieceTokenizer(cfg.text.path, model.text_max_length)
        elif cfg.text.kind != "none":
            raise ValueError(f"clip text kind {cfg.text.kind!r} is not supported (sentencepiece or none)")
        urls = shard_list(cfg.shards)
        first = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.ignore_and_continue))
        if next(iter(first), None) is None:  # an endless stream over shards without clips would never yield
            raise ValueError(f"no clips in {cfg.shards}")
        self.skipped = SkipCounter(cfg.shards, 100)
        shards, self.split = shard_source(urls, cfg.split, seed, rank, world, where=cfg.shards)
        buffer = cfg.shuffle_buffer
        pipeline = wds.DataPipeline(
            shards,
            wds.tarfile_to_samples(handler=self.skipped),
            wds.shuffle(buffer, initial=buffer, rng=random.Random(mix_seed(seed, rank, len(urls)))),
            wds.map(self.skipped.good),
        )
        self.clips = iter(pipeline)
        self.position = position
        for _ in range(position * batch_size):  # exact resume: the same raw clips again, not decoded
            self._next_clip()

    def _next_clip(self) -> dict:
        return next(self.clips)

    def next_batch(self, device: torch.device | str = "cpu") -> Clip:
        items = [self.decode(self._next_clip()) for _ in range(self.batch_size)]
        self.position += 1
        parts = [torch.cat(tensors) for tensors in zip(*(item[:6] for item in items), strict=True)]
        text = mask = None
        if self.tokenizer is not None:
            tokens = self.tokenizer([item[6] for item in items])
            text, mask = tokens.ids.to(device), tokens.mask.to(device)
        return Clip(*(p.to(device) for p in parts), text, mask)

    def decode(self, sample: dict) -> tuple:
        """One clip -> (context, future, actions, ids_context, ids_future, ids_actions, instruction)."""
        key = sample["__key__"]
        ctx = sorted(k for k in sample if k.startswith("ctx") and k.endswith(".jpg"))
        fut = sorted(k for k in sample if k.startswith("fut") and k.endswith(".jpg"))
        if not ctx or not fut or "actions.npy" not in sample:
            raise ValueError(f"clip {key}: needs ctx*.jpg, fut*.jpg and actions.npy, has {sorted(sample)}")
        frames = [Image.open(io.BytesIO(sample[k])) for k in ctx + fut]
        tokens, ids = frame_tokens(self.video, frames, self.cfg.frame_size)
        observed = ids[0, :, 0] < len(ctx)  # the frame index of each token (one frame per token)
        actions = (np.load(io.BytesIO(sample["actions.npy"])) - self.mean) / self.std
        if actions.shape[1] != self.cfg.action_dim:
            raise ValueError(f"clip {key}: actions.npy has {actions.shape[1]} columns, expected {self.cfg.action_dim}")
        act_ids = torch.zeros(1, len(actions), 4, dtype=torch.long)
        act_ids[0, :, 0] = len(ctx) - 1 + torch.arange(len(actions))
        instruction = sample.get("txt", b"").decode("utf-8")
        return (
            tokens[:, observed],
            tokens[:, ~observed],
            torch.from_numpy(actions.astype(np.float32))[None],
            ids[:, observed],
            ids[:, ~observed],
            act_ids,
            instruction,
        )
