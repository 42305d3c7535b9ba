"""Images `(B, 3, H, W)` in [-1, 1]: raw pixels, SD-VAE and FLUX.2 AE latents, tokens with ids `(0, h, w, 0)`.

DESIGN.md section 5. Latents are normalised here, never by the trunk or the loss:
- `RawPixels`: latent = pixels (tiny CPU models); the adapter patchifies p x p -> 3*p*p channels.
- `SDVAE` (diffusers `AutoencoderKL`, sd-vae-ft-ema): 8x, `(z - shift_factor) * scaling_factor`
  (0.18215, no shift for SD-VAE); the adapter patchifies 2x2 -> 16 channels (SiT/2).
- `Flux2AE` (diffusers `AutoencoderKLFlux2`): 32 channels at 8x, 2x2 patchify in `(c, pi, pj)`
  order -> 128 channels at 16x, then the AE's own BatchNorm running statistics
  `(z - running_mean) / sqrt(running_var + eps)` (eps = `batch_norm_eps`, 1e-4), as the FLUX.2
  pipeline does. The adapter's token patch is then 1.

    modality = ImageModality(Flux2AE("/models/flux2-ae"), patch=(1, 1))
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from selfflow.flow.paths import TimestepConfig
from selfflow.modalities.base import Identity, Modality, ModalityDefaults, check_media, load_pretrained


class ImageAutoencoder(nn.Module):
    """Shared media check of the image autoencoders: `(B, C, H, W)` with H, W multiples of `factor`."""

    modality = "image"

    def __init__(self, media_channels: int, latent_channels: int, factor: int):
        super().__init__()
        self.media_channels = media_channels
        self.latent_channels = latent_channels
        self.factor = factor  # spatial downsampling, media pixels per latent cell

    def latent_shape(self, media_shape: Sequence[int]) -> tuple[int, ...]:
        B, _, H, W = check_media("image", media_shape, "(B, C, H, W)", self.media_channels)
        f = self.factor
        if H % f or W % f or min(H, W) == 0:
            raise ValueError(f"image: resolution {H}x{W} is not divisible by the autoencoder's {f}x downsampling")
        return (B, self.latent_channels, H // f, W // f)


class RawPixels(Identity, ImageAutoencoder):
    """Identity autoencoder: the latent is the image itself."""

    def __init__(self, channels: int = 3):
        super().__init__(channels, channels, 1)


class SDVAE(ImageAutoencoder):
    """SD-VAE (`AutoencoderKL`): posterior mean (or a sample) times `scaling_factor`."""

    def __init__(self, path: str | Path, sample_posterior: bool = False, scale: float | None = None):
        from diffusers import AutoencoderKL  # here: diffusers takes seconds to import

        vae = load_pretrained(AutoencoderKL, path, "image")
        cfg = vae.config
        super().__init__(cfg.in_channels, cfg.latent_channels, 2 ** (len(cfg.block_out_channels) - 1))
        self.vae = vae
        self.sample_posterior = sample_posterior  # False: the posterior mean, deterministic
        self.scale = scale if scale is not None else (getattr(cfg, "scaling_factor", None) or 0.18215)
        self.shift = getattr(cfg, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode(self, media: Tensor) -> Tensor:
        self.latent_shape(media.shape)
        posterior = self.vae.encode(media.to(self.vae.dtype)).latent_dist
        z = posterior.sample() if self.sample_posterior else posterior.mean
        return (z.float() - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        z = latent.float() / self.scale + self.shift
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


class Flux2AE(ImageAutoencoder):
    """FLUX.2 AE (`AutoencoderKLFlux2`): mean -> 2x2 patchify `(c, pi, pj)` -> BatchNorm running stats."""

    def __init__(self, path: str | Path, eps: float | None = None):
        from diffusers import AutoencoderKLFlux2

        vae = load_pretrained(AutoencoderKLFlux2, path, "image")
        cfg = vae.config
        pi, pj = (int(p) for p in cfg.patch_size)
        if pi != pj:
            raise ValueError(f"image: FLUX.2 AE at {str(path)!r} has a non-square patch {cfg.patch_size}")
        if vae.bn.running_mean is None or vae.bn.running_var is None:
            raise ValueError(f"image: FLUX.2 AE at {str(path)!r} has no BatchNorm running statistics")
        base = 2 ** (len(cfg.block_out_channels) - 1)
        super().__init__(cfg.in_channels, cfg.latent_channels * pi * pj, base * pi)
        self.vae = vae
        self.pi, self.pj = pi, pj
        self.eps = eps if eps is not None else cfg.batch_norm_eps

    def bn_stats(self) -> tuple[Tensor, Tensor]:
        """Per-channel `(mean, std)` of the patchified latent, `(1, 4C, 1, 1)` float32."""
        mean = self.vae.bn.running_mean.float()[None, :, None, None]
        std = torch.sqrt(self.vae.bn.running_var.float() + self.eps)[None, :, None, None]
        return mean, std

    @torch.no_grad()
    def encode(self, media: Tensor) -> Tensor:
        self.latent_shape(media.shape)
        z = self.vae.encode(media.to(self.vae.dtype)).latent_dist.mean.float()
        z = rearrange(z, "b c (h pi) (w pj) -> b (c pi pj) h w", pi=self.pi, pj=self.pj)
        mean, std = self.bn_stats()
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        mean, std = self.bn_stats()
        z = latent.float() * std + mean
        z = rearrange(z, "b (c pi pj) h w -> b c (h pi) (w pj)", pi=self.pi, pj=self.pj)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


def image_defaults(distribution: str = "logit_normal") -> ModalityDefaults:
    """Mask ratio 0.25 (paper); timesteps follow the autoencoder (paper section 4.3: uniform for SD-VAE
    latents, logit-normal for FLUX.2 AE latents); the image train shift is unknown in the paper: 1.0."""
    return ModalityDefaults(mask_ratio=0.25, timesteps=TimestepConfig(distribution, shift=1.0))


class ImageModality(Modality):
    """Latent `(B, C, H', W')` -> tokens of `C * ph * pw` channels, ids `(0, h, w, 0)`."""

    name = "image"
    latent_ndim = 4

    def __init__(self, autoencoder: ImageAutoencoder, patch: Sequence[int] = (2, 2)):
        if len(patch) != 2:
            raise ValueError(f"image: patch must be (ph, pw), got {tuple(patch)}")
        distribution = "uniform" if isinstance(autoencoder, SDVAE) else "logit_normal"
        super().__init__(autoencoder, patch, image_defaults(distribution))

    @property
    def grid_patch(self) -> tuple[int, int, int]:
        return (1, *self.patch)

    def grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        return (1, int(latent_shape[2]), int(latent_shape[3]))

    def patch_error(self, grid: tuple[int, int, int]) -> str:
        f = self.autoencoder.factor
        size = f"{grid[1] * f}x{grid[2] * f}"
        return f"image: the token patch {self.patch} does not divide the {grid[1]}x{grid[2]} latent of a {size} image"
