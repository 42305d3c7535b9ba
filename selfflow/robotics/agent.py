"""The finetuned trunk as a policy's action sampler (`policy.ActionSampler`).

Given the last C observed frames and the instruction, it builds the joint sequence the trunk was
finetuned on, holds the F future frames at pure noise (t = 1) and integrates the H-step action
chunk from noise (`video_action.sample_action_chunk`); the normalised chunk goes back to the
policy, which un-normalises it with the same `stats.json`.

    sampler = TrunkSampler(model, data_cfg, future_frames=4, action_horizon=4, steps=10)
    policy = ChunkPolicy(sampler, ActionStats.from_json("data/rt1/clips/stats.json"), PolicyConfig())

`selfflow robotics eval-simpler` (`eval_simpler`) builds that policy from an export and runs the
SIMPLER tasks after the preflight check.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from selfflow.backbone.checkpoint import load_export
from selfflow.backbone.mmdit import MMDiT
from selfflow.modalities.builder import ModalityConfig, build_modality
from selfflow.modalities.text import SentencePieceTokenizer
from selfflow.robotics.clips import ClipDataConfig, frame_tokens
from selfflow.robotics.policy import ActionStats, ChunkPolicy, PolicyConfig
from selfflow.robotics.simpler import SimplerConfig, main_eval_simpler
from selfflow.robotics.video_action import Clip, sample_action_chunk


class TrunkSampler:
    def __init__(
        self, model: MMDiT, data: ClipDataConfig, future_frames: int, action_horizon: int, steps: int = 10, seed=0
    ):
        self.model, self.data, self.steps, self.seed = model.eval(), data, steps, seed
        self.future_frames, self.action_horizon = future_frames, action_horizon
        self.video = build_modality(ModalityConfig("video", "raw", patch=list(data.patch)))
        self.tokenizer = None
        if data.text.kind == "sentencepiece":
            self.tokenizer = SentencePieceTokenizer(data.text.path, model.cfg.text_max_length)
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0

    def sample(self, frames: np.ndarray, instruction: str) -> np.ndarray:
        """Normalised action chunk `(H, action_dim)` for uint8 frames `(C, H, W, 3)`."""
        device = next(self.model.parameters()).device
        n_ctx = len(frames)
        blank = [np.zeros_like(frames[0])] * self.future_frames  # placeholders: held at t = 1 (noise)
        tokens, ids = frame_tokens(self.video, [*frames, *blank], self.data.frame_size)
        observed = ids[0, :, 0] < n_ctx
        act_ids = torch.zeros(1, self.action_horizon, 4, dtype=torch.long)
        act_ids[0, :, 0] = n_ctx - 1 + torch.arange(self.action_horizon)
        text = mask = None
        if self.tokenizer is not None:
            tokens_txt = self.tokenizer([instruction])
            text, mask = tokens_txt.ids.to(device), tokens_txt.mask.to(device)
        clip = Clip(
            tokens[:, observed].to(device),
            tokens[:, ~observed].to(device),
            torch.zeros(1, self.action_horizon, self.data.action_dim, device=device),
            ids[:, observed].to(device),
            ids[:, ~observed].to(device),
            act_ids.to(device),
            text,
            mask,
        )
        gen = torch.Generator().manual_seed(self.seed + self.calls)
        self.calls += 1
        return sample_action_chunk(self.model, clip, self.steps, gen)[0].cpu().numpy()


@dataclass
class EvalSimplerConfig:
    checkpoint: str = "runs/robotics/export/ema.safetensors"  # `selfflow export` of a finetuned run
    data: ClipDataConfig = field(default_factory=ClipDataConfig)  # the finetuning run's frames, text, stats
    future_frames: int = 4  # as finetuned (convert's future_frames)
    sampling_steps: int = 10  # Euler steps of the action chunk
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    simpler: SimplerConfig = field(default_factory=SimplerConfig)
    device: str = "auto"


def make_policy(cfg: EvalSimplerConfig) -> ChunkPolicy:
    """The finetuned trunk behind SIMPLER's policy interface; stats un-normalise as clips normalised."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_export(cfg.checkpoint)
    sampler = TrunkSampler(model.to(device), cfg.data, cfg.future_frames, cfg.policy.action_horizon, cfg.sampling_steps)
    stats = ActionStats.from_json(cfg.data.stats or Path(cfg.data.shards) / "stats.json", kind="mean_std")
    return ChunkPolicy(sampler, stats, cfg.policy)


def eval_simpler(cfg: EvalSimplerConfig) -> int:
    """`selfflow robotics eval-simpler`: preflight, then the SIMPLER tasks; 2 when SIMPLER cannot run here."""
    return main_eval_simpler(cfg.simpler, lambda: make_policy(cfg))
