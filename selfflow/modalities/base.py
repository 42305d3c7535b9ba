"""The modality adapter interface: raw media <-> normalised latent <-> tokens with `(t, h, w, l)` ids.

DESIGN.md sections 1 and 5. A `Modality` pairs one autoencoder (which owns the media checks and
the latent normalisation) with a token patch. Every latent is viewed as a 3-D grid
`(B, C, T, H, W)`: images have `T = 1`, audio has `H = W = 1`, so one tokenizer serves all three
and ids come out as image `(0, h, w, 0)`, video `(frame, h, w, 0)`, audio `(frame, 0, 0, 0)`.

    modality = build_modality(ModalityConfig("image", "flux2", path="/models/flux2-ae"))
    latent = modality.encode(images)                      # (B, 128, H/16, W/16), normalised
    tokens, ids = modality.tokenize(latent)               # (B, L, 128), (B, L, 4) int64
    latent = modality.scatter(tokens, ids, latent.shape)  # any token order
    images = modality.decode(latent)                      # (B, 3, H, W) in [-1, 1]

Autoencoders load from a local folder only (`from_pretrained(path, local_files_only=True)`).
"""

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from selfflow.flow.paths import TimestepConfig
from selfflow.modalities.grid import patchify_3d, unpatchify_3d


@dataclass
class ModalityDefaults:
    """A modality's noising defaults from the paper (mask ratio, timestep distribution, sampling shift)."""

    mask_ratio: float
    timesteps: TimestepConfig
    sample_shift: float = 1.0


class Autoencoder(Protocol):
    """Media <-> normalised latent. Implemented by the raw and pretrained autoencoders of each modality."""

    modality: str  # "image" | "video" | "audio", used in error messages
    media_channels: int
    latent_channels: int

    def latent_shape(self, media_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent shape for a media shape; a `ValueError` naming the modality for media it cannot take."""

    def encode(self, media: Tensor) -> Tensor: ...

    def decode(self, latent: Tensor) -> Tensor: ...

    def to(self, *args, **kwargs): ...


class Identity:
    """`encode` / `decode` of the raw autoencoders: the latent is the media itself (shape-checked)."""

    def encode(self, media: Tensor) -> Tensor:
        self.latent_shape(media.shape)
        return media

    def decode(self, latent: Tensor) -> Tensor:
        return latent


@torch.no_grad()
def encode_normalised(vae, media: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Posterior mean of a diffusers VAE, normalised per channel: `(z - mean) / std` in float32."""
    z = vae.encode(media.to(vae.dtype)).latent_dist.mean.float()
    return (z - mean) / std


@torch.no_grad()
def decode_normalised(vae, latent: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Inverse of `encode_normalised`: media in [-1, 1] (float32)."""
    z = latent.float() * std + mean
    return vae.decode(z.to(vae.dtype)).sample.float().clamp(-1, 1)


def load_pretrained(cls, path: str | Path | None, modality: str):
    """`cls.from_pretrained` from a local folder, frozen and in eval mode; never touches a hub."""
    folder = Path(path) if path else None
    if folder is None or not folder.is_dir():
        raise ValueError(f"{modality}: autoencoder folder {path!r} does not exist")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{modality}: autoencoder folder {str(folder)!r} has no config.json")
    class_name = json.loads(config_file.read_text()).get("_class_name", cls.__name__)
    if class_name != cls.__name__:
        raise ValueError(f"{modality}: {str(folder)!r} holds a {class_name}, expected a {cls.__name__}")
    model = cls.from_pretrained(folder, local_files_only=True)
    return model.eval().requires_grad_(False)


class Modality:
    """One modality: its autoencoder, token patch and defaults. Subclasses say how the latent maps to `(T, H, W)`."""

    name: str
    latent_ndim: int  # 4 image, 5 video, 3 audio

    def __init__(self, autoencoder: Autoencoder, patch: Sequence[int], defaults: ModalityDefaults):
        if autoencoder.modality != self.name:
            raise ValueError(f"{self.name}: got a {autoencoder.modality} autoencoder")
        if any(p < 1 for p in patch):
            raise ValueError(f"{self.name}: patch sizes must be >= 1, got {tuple(patch)}")
        self.autoencoder = autoencoder
        self.patch = tuple(int(p) for p in patch)
        self.defaults = defaults
        self.token_dim = autoencoder.latent_channels * math.prod(self.patch)

    # -- how this modality's latent sits in the shared (T, H, W) grid --------------------------
    @property
    def grid_patch(self) -> tuple[int, int, int]:
        """The token patch along `(T, H, W)`."""
        raise NotImplementedError

    def grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """Latent sizes along `(T, H, W)` (before patching)."""
        raise NotImplementedError

    def patch_error(self, grid: tuple[int, int, int]) -> str:
        """What to tell the user when the token patch does not divide the latent grid."""
        return f"{self.name}: the token patch {self.patch} does not divide the latent grid {grid}"

    # -- the interface ------------------------------------------------------------------------
    def latent_shape(self, media_shape: Sequence[int]) -> tuple[int, ...]:
        """The latent grid shape for a media shape (samplers draw noise of this shape)."""
        shape = tuple(int(s) for s in self.autoencoder.latent_shape(media_shape))
        self.check_latent(shape)
        return shape

    def encode(self, media: Tensor) -> Tensor:
        """Media -> normalised latent grid."""
        expected = self.latent_shape(media.shape)
        latent = self.autoencoder.encode(media)
        if tuple(latent.shape) != expected:
            raise RuntimeError(f"{self.name}: autoencoder gave {tuple(latent.shape)}, its config implies {expected}")
        return latent

    def decode(self, latent: Tensor) -> Tensor:
        """Normalised latent grid -> media."""
        self.check_latent(latent.shape)
        return self.autoencoder.decode(latent)

    def tokenize(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """Latent -> tokens `(B, L, token_dim)` in `(t h w)` order and ids `(B, L, 4)` int64."""
        self.check_latent(latent.shape)
        B, C = latent.shape[:2]
        return patchify_3d(latent.reshape(B, C, *self.grid(latent.shape)), self.grid_patch)

    def scatter(self, tokens: Tensor, ids: Tensor, latent_shape: Sequence[int]) -> Tensor:
        """Tokens back to the latent grid by their ids: the exact inverse of `tokenize`, in any token order."""
        latent_shape = tuple(int(s) for s in latent_shape)
        self.check_latent(latent_shape)
        if tokens.shape[0] != latent_shape[0] or tokens.shape[-1] != self.token_dim:
            raise ValueError(
                f"{self.name}: tokens {tuple(tokens.shape)} do not fit batch {latent_shape[0]} x {self.token_dim} ch"
            )
        tokens_grid = tuple(g // p for g, p in zip(self.grid(latent_shape), self.grid_patch, strict=True))
        grid = unpatchify_3d(tokens, ids, self.grid_patch, latent_shape[1], tokens_grid)
        return grid.reshape(latent_shape)

    def check_latent(self, shape: Sequence[int]) -> None:
        """A `ValueError` naming the modality for a latent this modality cannot tokenize."""
        shape = tuple(shape)
        if len(shape) != self.latent_ndim:
            raise ValueError(f"{self.name}: expected a {self.latent_ndim}-D latent, got shape {shape}")
        if shape[1] != self.autoencoder.latent_channels:
            channels = self.autoencoder.latent_channels
            raise ValueError(f"{self.name}: expected {channels} latent channels, got {shape[1]} (shape {shape})")
        grid = self.grid(shape)
        if any(g < 1 or g % p for g, p in zip(grid, self.grid_patch, strict=True)):
            raise ValueError(self.patch_error(grid))

    def to(self, *args, **kwargs) -> "Modality":
        """Move the autoencoder (`modality.to("cuda", torch.bfloat16)`)."""
        self.autoencoder.to(*args, **kwargs)
        return self


def check_media(modality: str, media_shape: Sequence[int], layout: str, channels: int) -> tuple[int, ...]:
    """Shared first check of every autoencoder: rank and channel count of the media."""
    shape = tuple(int(s) for s in media_shape)
    if len(shape) != layout.count(",") + 1:
        raise ValueError(f"{modality}: expected media {layout} with C = {channels}, got shape {shape}")
    if shape[1] != channels:
        raise ValueError(f"{modality}: expected {channels} channels, got {shape[1]} (shape {shape})")
    return shape
