"""`selfflow sample`: class-conditional samples from a SiT checkpoint (e.g. the public ImageNet 256).

Loads a local checkpoint (or keeps a randomly initialised model when none is given) and a
local SD-VAE folder (`AutoencoderKL.from_pretrained(path)`; no hub access), draws N samples
with the release's defaults (SDE, 250 steps, CFG 1.0) or chosen ones, and writes one PNG per
sample plus an ADM-evaluator `.npz` (`arr_0`, uint8 NHWC) and the resolved config.

Sample i gets class `i % (num_classes - 1)` unless classes are given, and all of its noise
(initial and SDE) comes from a generator seeded by `(seed, i)`, so the set of images does not
depend on batch size or on the number of processes. Multi-GPU:

    torchrun --nproc-per-node 8 -m selfflow.cli sample --config configs/sample/imagenet256.yaml \\
        checkpoint=/ckpt/selfflow_imagenet256.pt vae=/ckpt/sd-vae-ft-ema num_samples=50000
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from selfflow.backbone.checkpoint import load_weights
from selfflow.backbone.sit import SiT, SiTConfig
from selfflow.config import save_config
from selfflow.eval.media import to_uint8
from selfflow.flow.samplers import PerSampleNoise, SamplerConfig, sample
from selfflow.modalities.grid import patchify, unpatchify
from selfflow.progress import progress
from selfflow.ranks import barrier, joined


@dataclass
class SampleConfig:
    model: SiTConfig = field(default_factory=SiTConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    checkpoint: str | None = None  # local weights file; None keeps a randomly initialised model
    weights: str = "ema"  # which weights to prefer in a training checkpoint: "ema" or "model"
    vae: str | None = None  # local diffusers AutoencoderKL folder; None: latents are RGB pixels in [-1, 1]
    vae_scale: float = 0.18215  # SD-VAE latent scale
    num_samples: int = 16
    batch_size: int = 16  # per process
    classes: list[int] | None = None  # class per sample (cycled); None: i % (num_classes - 1)
    seed: int = 0
    out_dir: str = "outputs/samples"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", ...
    save_png: bool = True

    def __post_init__(self):
        if self.weights not in ("ema", "model"):
            raise ValueError(f"weights must be 'ema' or 'model', got {self.weights!r}")
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {self.num_samples}, {self.batch_size}")
        if self.vae is None and self.model.in_channels != 3:
            raise ValueError(f"without a vae the model must have in_channels=3 (pixels), got {self.model.in_channels}")
        if self.classes is not None and any(not 0 <= c < self.model.num_classes for c in self.classes):
            raise ValueError(f"classes must lie in [0, {self.model.num_classes}), got {self.classes}")


def sample_seed(seed: int, index: int) -> int:
    """Generator seed of sample `index`: distinct for every index of one run seed.

    torch's CPU generator keeps only the low 32 bits of a seed, so the pair is folded into 32 bits.
    Not `data.batch.mix_seed` on purpose: that hashes, and 50,000 hashed 32-bit seeds collide with
    probability ~0.25 (two samples would share all their noise); this map is one-to-one in `index`.
    """
    return (seed * 0x9E3779B1 + index) % 2**32


def class_labels(cfg: SampleConfig, indices: list[int]) -> Tensor:
    if cfg.classes:
        return torch.tensor([cfg.classes[i % len(cfg.classes)] for i in indices])
    return torch.tensor([i % max(cfg.model.num_classes - 1, 1) for i in indices])


def build_model(cfg: SampleConfig, device: torch.device) -> SiT:
    model = SiT(cfg.model)
    if cfg.checkpoint:
        prefer = ("ema", "model", "state_dict", "module") if cfg.weights == "ema" else ("model", "state_dict", "ema")
        report = load_weights(model, cfg.checkpoint, prefer=prefer)
        tqdm.write(str(report))
        if report.missing:
            raise ValueError(
                f"{cfg.checkpoint} lacks {len(report.missing)} weights of this model: {report.missing[:8]}"
            )
    else:
        torch.manual_seed(cfg.seed)
        model.init_weights()
        # A zero-initialised head would only ever output zeros: give the random demo model some signal.
        for p in model.parameters():
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.02)
    return model.to(device).eval()


def load_vae(path: str, device: torch.device):
    """A diffusers AutoencoderKL from a local folder, with a clear error when it is not there."""
    from diffusers import AutoencoderKL

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"vae folder {folder} has no config.json (expected a diffusers AutoencoderKL folder)")
    return AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False).to(device).eval()


@torch.no_grad()
def sample_batch(model: SiT, vae, cfg: SampleConfig, indices: list[int], device: torch.device) -> np.ndarray:
    """uint8 NHWC images of samples `indices`: latents decoded by the SD-VAE (or read as pixels without one)."""
    latents = sample_latents(model, cfg, indices, device)
    images = vae.decode(latents / cfg.vae_scale).sample if vae is not None else latents
    return to_uint8(images.float())


@torch.no_grad()
def sample_latents(model: SiT, cfg: SampleConfig, indices: list[int], device: torch.device) -> Tensor:
    """The latent grids `(n, C, H, W)` of samples `indices`, sample i seeded by `(cfg.seed, i)`."""
    m = cfg.model
    noise_source = PerSampleNoise([sample_seed(cfg.seed, i) for i in indices])
    latent_noise = torch.stack(
        [torch.randn(m.in_channels, m.input_size, m.input_size, generator=g) for g in noise_source.generators]
    )
    noise, ids = patchify(latent_noise.to(device), m.patch_size)
    labels = class_labels(cfg, indices).to(device)
    tokens = sample(
        lambda x, t, y: model(x, t, y, ids[:1].expand(x.shape[0], -1, -1)),
        noise,
        labels,
        cfg.sampler,
        null_label=m.null_class,
        noise_source=noise_source,
    )
    return unpatchify(tokens, ids, m.patch_size, m.in_channels, m.grid, m.grid)


def run_sample(cfg: SampleConfig) -> Path:
    """Draw `cfg.num_samples` images into `cfg.out_dir`; returns the `.npz` path (rank 0)."""
    with joined(cfg.device) as (rank, world, device):
        out = Path(cfg.out_dir)
        png_dir = out / "png"
        png_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            save_config(cfg, out / "config.yaml")
        model = build_model(cfg, device)
        vae = load_vae(cfg.vae, device) if cfg.vae else None

        mine = list(range(rank, cfg.num_samples, world))
        batches = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        for indices in progress(batches, desc=f"sampling (rank {rank})", disable=rank != 0):
            for i, image in zip(indices, sample_batch(model, vae, cfg, indices, device), strict=True):
                Image.fromarray(image).save(png_dir / f"{i:06d}.png")

        barrier()
        npz = out / f"samples_{cfg.num_samples}.npz"
        if rank == 0:
            arr = np.stack([np.asarray(Image.open(png_dir / f"{i:06d}.png")) for i in range(cfg.num_samples)])
            np.savez(npz, arr_0=arr)
            tqdm.write(f"wrote {len(arr)} samples to {png_dir} and {npz} (shape {arr.shape})")
            if not cfg.save_png:
                for i in range(cfg.num_samples):
                    (png_dir / f"{i:06d}.png").unlink()
                png_dir.rmdir()
        barrier()
    return npz
