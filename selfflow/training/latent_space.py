"""What pretraining needs to know about a modality's latent space: its autoencoder, and pixels for REPA.

- The autoencoder of prepared data is the adapter config that `selfflow prepare` recorded in the data
  folder's `manifest.json` (`modalities.<name>.modality`); in-memory synthetic latents count as raw
  media. Training timesteps with `distribution: auto` follow it (paper section 4.3:
  `selfflow.modalities.builder.timestep_distribution`).
- REPA on any latent space (sihyun-yu/REPA aligns to a frozen image encoder's patch tokens of the same
  image): the clean tokens x0 are decoded to pixels by that adapter, the job's encoder function runs
  on the pixels, and each token gets the encoder feature at its own `(h, w)` (by its ids, so any token
  order works). Video: the image encoder runs on every decoded frame, and a token's target is the mean
  over the frames its latent frame covers (Wan2.2: frame 0 alone, then 4 frames per latent frame; raw
  frames: their temporal patch), a per-frame REPA as the paper's video REPA-DINOv2 baseline (its exact
  frame handling is not stated). Audio has no encoder here: a config error, unless listed in
  `objective.repa_skip`.

    adapter = build_modality(repa_modality_config("image", shards=None, channels=12))   # raw 2x2 pixels
    target = repa_targets(adapter, batch.x0, batch.ids, encode, device)              # (B, L, d)
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from selfflow.modalities.base import Modality
from selfflow.modalities.builder import ModalityConfig

REPA_MODALITIES = ("image", "video")  # served by an image encoder (video frame by frame)

# images (N, 3, H, W) in [-1, 1], the token grid (h, w), the loss's device -> features (N, h*w, d)
RepaTarget = Callable[[Tensor, tuple[int, int], torch.device], Tensor]


def raw_modality(name: str, channels: int) -> ModalityConfig:
    """In-memory synthetic tokens read as raw media: 3-channel `p x p` patches (video `1 x p x p`)."""
    patch = math.isqrt(channels // 3)
    if name not in REPA_MODALITIES or 3 * patch * patch != channels:
        raise ValueError(
            f"REPA needs pixels: synthetic {name} tokens of {channels} channels are not raw 3 x p x p patches"
        )
    return ModalityConfig(name, "raw", patch=[patch, patch] if name == "image" else [1, patch, patch])


def latent_shape(adapter: Modality, ids: Tensor) -> tuple[int, ...]:
    """The latent grid of a batch whose tokens cover the id grid `(T, h, w)` from 0 (one shape per batch)."""
    tokens = [int(ids[0, :, axis].max()) + 1 for axis in range(3)]
    t, h, w = (g * p for g, p in zip(tokens, adapter.grid_patch, strict=True))
    channels = adapter.autoencoder.latent_channels
    return (len(ids), channels, h, w) if adapter.name == "image" else (len(ids), channels, t, h, w)


def token_frame_of_pixel_frame(adapter: Modality, frames: int) -> Tensor:
    """`(frames,)` index of the token frame each decoded video frame belongs to."""
    ae, pt = adapter.autoencoder, adapter.grid_patch[0]
    index = torch.arange(frames)
    if getattr(ae, "causal", False):  # Wan: latent frame 0 <- frame 0, latent frame i <- frames 4i-3 .. 4i
        latent = torch.where(index == 0, 0, (index - 1) // ae.temporal + 1)
    else:
        latent = index // getattr(ae, "temporal", 1)
    return latent // pt


@torch.no_grad()
def repa_targets(adapter: Modality, x0: Tensor, ids: Tensor, encode: RepaTarget, device: torch.device) -> Tensor:
    """REPA's target for every token `(B, L, d)`: the frozen encoder's feature of the decoded pixels at the
    token's position (video: averaged over the frames of the token's latent frame)."""
    latent = adapter.scatter(x0.to(device).float(), ids.to(device), latent_shape(adapter, ids))
    media = adapter.decode(latent)  # image (B, 3, H, W), video (B, 3, T, H, W); in [-1, 1]
    h, w = (int(ids[0, :, axis].max()) + 1 for axis in (1, 2))
    B = len(x0)
    if adapter.name == "image":
        features = encode(media, (h, w), device)[:, None]  # (B, 1, h*w, d)
    else:
        frames = media.shape[2]
        per_frame = encode(media.transpose(1, 2).flatten(0, 1), (h, w), device)  # (B*T, h*w, d)
        per_frame = per_frame.unflatten(0, (B, frames))
        owner = token_frame_of_pixel_frame(adapter, frames).to(device)
        n_tok = int(ids[0, :, 0].max()) + 1
        summed = per_frame.new_zeros(B, n_tok, *per_frame.shape[2:]).index_add_(1, owner, per_frame)
        counts = torch.bincount(owner, minlength=n_tok).clamp(min=1).to(per_frame.dtype)
        features = summed / counts[None, :, None, None]  # (B, T_tok, h*w, d)
    ids = ids.to(device)
    where = ids[..., 1] * w + ids[..., 2]  # (B, L) position in the (h w) grid
    frame = ids[..., 0] if adapter.name == "video" else torch.zeros_like(where)
    batch = torch.arange(B, device=device)[:, None]
    return features[batch, frame, where]  # (B, L, d)
