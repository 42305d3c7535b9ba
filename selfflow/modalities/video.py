"""Videos `(B, 3, T, H, W)` in [-1, 1]: raw frames or Wan2.2 VAE latents, tokens with ids `(frame, h, w, 0)`.

DESIGN.md section 5. `frame` is the latent frame index after the temporal token patch.
- `RawFrames`: latent = frames (tiny CPU models); the adapter patchifies `(pt, ph, pw)`.
- `WanVAE` (diffusers `AutoencoderKLWan`, Wan2.2: 48 channels, 4x time, 16x space): a causal
  video VAE, so T frames must be `4n + 1` and give `1 + (T - 1) / 4` latent frames (45 frames
  -> 12). Latents are normalised per channel, `(z - latents_mean) / latents_std`, with the
  statistics of the model config (as the diffusers Wan pipelines do). Token patch (1, 1, 1).

    modality = VideoModality(WanVAE("/models/wan2.2-vae"), patch=(1, 1, 1))
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from selfflow.flow.paths import TimestepConfig
from selfflow.modalities.base import (
    Identity,
    Modality,
    ModalityDefaults,
    check_media,
    decode_normalised,
    encode_normalised,
    load_pretrained,
)

WAN_CHUNK = 4  # diffusers' Wan encoder reads frame 0, then chunks of 4 frames


class VideoAutoencoder(nn.Module):
    """Shared media check of the video autoencoders: `(B, C, T, H, W)`; causal ones need `4n + 1` frames."""

    modality = "video"

    def __init__(self, media_channels: int, latent_channels: int, temporal: int, spatial: int, causal: bool):
        super().__init__()
        self.media_channels = media_channels
        self.latent_channels = latent_channels
        self.temporal = temporal  # frames per latent frame (after the causal first frame)
        self.spatial = spatial  # pixels per latent cell along H and W
        self.causal = causal

    def latent_shape(self, media_shape: Sequence[int]) -> tuple[int, ...]:
        B, _, T, H, W = check_media("video", media_shape, "(B, C, T, H, W)", self.media_channels)
        if self.causal:
            if T < 1 or (T - 1) % WAN_CHUNK:
                raise ValueError(f"video: the Wan VAE needs 4n+1 frames (1, 5, 9, ...), got {T} frames")
            frames = 1 + (T - 1) // self.temporal
        else:
            if T < 1 or T % self.temporal:
                raise ValueError(f"video: {T} frames are too few or not a multiple of {self.temporal}")
            frames = T // self.temporal
        s = self.spatial
        if H % s or W % s or min(H, W) == 0:
            raise ValueError(f"video: resolution {H}x{W} is not divisible by the autoencoder's {s}x downsampling")
        return (B, self.latent_channels, frames, H // s, W // s)


class RawFrames(Identity, VideoAutoencoder):
    """Identity autoencoder: the latent is the video itself."""

    def __init__(self, channels: int = 3):
        super().__init__(channels, channels, 1, 1, causal=False)


class WanVAE(VideoAutoencoder):
    """Wan2.x VAE (`AutoencoderKLWan`): posterior mean, per-channel `(z - mean) / std` from the config."""

    def __init__(self, path: str | Path):
        from diffusers import AutoencoderKLWan  # here: diffusers takes seconds to import

        vae = load_pretrained(AutoencoderKLWan, path, "video")
        cfg = vae.config
        p = cfg.patch_size or 1  # Wan2.2 folds 2x2 pixels into channels before the encoder (12 = 3 * 2 * 2)
        temporal = 2 ** sum(bool(d) for d in cfg.temperal_downsample)
        if WAN_CHUNK % temporal:
            raise ValueError(f"video: Wan VAE at {str(path)!r} downsamples time {temporal}x, which does not divide 4")
        spatial = 2 ** (len(cfg.dim_mult) - 1) * p
        super().__init__(cfg.in_channels // (p * p), cfg.z_dim, temporal, spatial, causal=True)
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"video: Wan VAE at {str(path)!r} needs {cfg.z_dim} latents_mean/latents_std values")
        self.vae = vae
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1), persistent=False)

    def encode(self, media: Tensor) -> Tensor:
        self.latent_shape(media.shape)
        return encode_normalised(self.vae, media, self.mean, self.std)

    def decode(self, latent: Tensor) -> Tensor:
        return decode_normalised(self.vae, latent, self.mean, self.std)


def video_defaults() -> ModalityDefaults:
    """Mask ratio 0.10 (paper); the video train shift is unknown in the paper: 1.0."""
    return ModalityDefaults(mask_ratio=0.10, timesteps=TimestepConfig("logit_normal", shift=1.0))


class VideoModality(Modality):
    """Latent `(B, C, T', H', W')` -> tokens of `C * pt * ph * pw` channels, ids `(frame, h, w, 0)`."""

    name = "video"
    latent_ndim = 5

    def __init__(self, autoencoder: VideoAutoencoder, patch: Sequence[int] = (1, 1, 1)):
        if len(patch) != 3:
            raise ValueError(f"video: patch must be (pt, ph, pw), got {tuple(patch)}")
        super().__init__(autoencoder, patch, video_defaults())

    @property
    def grid_patch(self) -> tuple[int, int, int]:
        return self.patch

    def grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        return (int(latent_shape[2]), int(latent_shape[3]), int(latent_shape[4]))

    def patch_error(self, grid: tuple[int, int, int]) -> str:
        T, H, W = grid
        pt, ph, pw = self.patch
        if T % pt or T == 0:
            return f"video: {T} latent frames are too few for, or not a multiple of, the temporal patch {pt}"
        s = self.autoencoder.spatial
        return f"video: the token patch {ph}x{pw} does not divide the {H}x{W} latent of a {H * s}x{W * s} video"
