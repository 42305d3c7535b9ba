"""Pretrained embedding networks for evaluation, loaded from local `transformers` folders: DINOv2, CLIP, CLAP.

- DINOv2 (FD-DINO): the CLS embedding (`Dinov2Model` pooler output: the final-layer-normed CLS token,
  which is torch-hub DINOv2's `x_norm_clstoken`), with layer6ai-labs/dgm-eval `models/dinov2.py`
  preprocessing: PIL bicubic resize to 224x224 (no crop), /255, ImageNet mean/std.
- CLIP (CLIP score): `CLIPModel` image and text embeddings (projected, not normalised), with the folder's
  image-processor config run by the PIL backend (`CLIPImageProcessorPil`, the original CLIP's PIL
  bicubic resize + centre crop) and its `CLIPTokenizer`.
- CLAP (FAD): `ClapModel.get_audio_features` (projected and L2-normalised) on `ClapFeatureExtractor`
  log-mels at the extractor's rate (48 kHz for LAION CLAP); other rates are resampled with torchaudio.
- REPA targets (`RepaEncoder`, used in training): the patch tokens of a frozen ViT-like encoder with
  REPA's preprocessing (sihyun-yu/REPA train.py `preprocess_raw_image`: ImageNet mean/std unless the
  folder's `preprocessor_config.json` says otherwise, bicubic resize to 224 for DINOv2), resized to the
  trunk's token grid when the grids differ; or the built-in feature net's conv maps
  (`selfflow.eval.builtin_features`).

Each loader takes a local directory (`from_pretrained(dir, local_files_only=True)`; nothing is
downloaded), checks the files it needs first (FileNotFoundError naming the directory and file), and
records the sha256 of the weight file(s):

    dino = load_dinov2("/ckpt/dinov2-vitl14")
    feats = dino.embed(images_uint8_nhwc)         # (N, 1024) float32
    clip = load_clip("/ckpt/clip-vit-large-patch14")
    img, txt = clip.embed(images_uint8_nhwc), clip.embed_text(captions)
    clap = load_clap("/ckpt/clap-htsat-unfused")
    audio = clap.embed(waveforms, sample_rate=16000)   # (N, 512), rows of unit norm
    dino.sha256, dino.weight_sha256                # combined digest, {file name: digest}
"""

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor
from transformers import AutoModel, ClapFeatureExtractor, ClapModel, CLIPModel, CLIPTokenizer, Dinov2Model
from transformers.models.clip import CLIPImageProcessorPil

from selfflow.eval.builtin_features import load_feature_net
from selfflow.eval.inception import ieee_fp32
from selfflow.files import file_sha256

# dgm-eval models/dinov2.py: torchvision Resize((224, 224), BICUBIC) on PIL images, then ImageNet stats.
DINO_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# transformers' weight file names, single file first; a sharded checkpoint is found through its index.
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # either set loads a CLIPTokenizer


def _require(local_dir: Path, what: str, names: tuple[str, ...]) -> None:
    """FileNotFoundError naming the directory and the first missing file."""
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {local_dir}")
    for name in names:
        if not (local_dir / name).is_file():
            raise FileNotFoundError(f"{what} directory {local_dir} has no {name}")


def weight_files(local_dir: str | Path) -> list[Path]:
    """The weight file(s) `from_pretrained` reads from a local folder (single file or index shards)."""
    local_dir = Path(local_dir)
    for name in SINGLE_WEIGHTS:
        if (local_dir / name).is_file():
            return [local_dir / name]
    for name in SHARD_INDEXES:
        if (local_dir / name).is_file():
            shards = sorted(set(json.loads((local_dir / name).read_text())["weight_map"].values()))
            for shard in shards:
                if not (local_dir / shard).is_file():
                    raise FileNotFoundError(f"{local_dir} has no {shard} (listed in {name})")
            return [local_dir / shard for shard in shards]
    raise FileNotFoundError(f"{local_dir} has no weights: expected one of {SINGLE_WEIGHTS + SHARD_INDEXES}")


def weights_sha256(local_dir: str | Path) -> tuple[str, dict[str, str]]:
    """(combined digest, {file name: sha256}). One file: its own digest; shards: sha256 of "name digest" lines."""
    digests = {path.name: file_sha256(path) for path in weight_files(local_dir)}
    if len(digests) == 1:
        return next(iter(digests.values())), digests
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest(), digests


def _uint8_images(images: Tensor | np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 array on the CPU, or a ValueError naming the shape/dtype received."""
    array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {array.dtype} {array.shape}")
    return array


# ---------------------------------------------------------------------------------------------
# DINOv2
# ---------------------------------------------------------------------------------------------


def dinov2_preprocess(images: Tensor | np.ndarray) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, 224, 224) float32: PIL bicubic resize, /255, ImageNet mean/std."""
    size = (DINO_RESOLUTION, DINO_RESOLUTION)
    resized = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC)) for im in _uint8_images(images)])
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float().div(255)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class DinoV2Encoder:
    model: Dinov2Model
    sha256: str
    weight_sha256: dict[str, str]

    @torch.no_grad()
    def embed(self, images: Tensor | np.ndarray) -> Tensor:
        """(N, H, W, 3) uint8 -> (N, hidden) float32 CLS embeddings."""
        with ieee_fp32():
            x = dinov2_preprocess(images).to(self.model.device)
            return self.model(pixel_values=x).pooler_output.float()


def load_dinov2(local_dir: str | Path, device: torch.device | str = "cpu") -> DinoV2Encoder:
    """A `Dinov2Model` folder (config.json + weights) -> eval-mode encoder on `device`."""
    local_dir = Path(local_dir)
    _require(local_dir, "DINOv2", ("config.json",))
    sha256, per_file = weights_sha256(local_dir)
    model = Dinov2Model.from_pretrained(local_dir, local_files_only=True).eval().requires_grad_(False).to(device)
    return DinoV2Encoder(model=model, sha256=sha256, weight_sha256=per_file)


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


@dataclass
class ClipEncoder:
    model: CLIPModel
    image_processor: CLIPImageProcessorPil
    tokenizer: CLIPTokenizer
    sha256: str
    weight_sha256: dict[str, str]

    @torch.no_grad()
    def embed(self, images: Tensor | np.ndarray) -> Tensor:
        """(N, H, W, 3) uint8 -> (N, projection_dim) float32 image embeddings (not normalised)."""
        pixels = self.image_processor(images=list(_uint8_images(images)), return_tensors="pt")["pixel_values"]
        with ieee_fp32():
            return self.model.get_image_features(pixel_values=pixels.to(self.model.device)).pooler_output.float()

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> Tensor:
        """N captions -> (N, projection_dim) float32 text embeddings; longer captions are truncated (eos kept)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"embed_text expects a list of strings, got {type(texts).__name__}")
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with ieee_fp32():
            out = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.model.device),
                attention_mask=tokens["attention_mask"].to(self.model.device),
            )
        return out.pooler_output.float()


def load_clip(local_dir: str | Path, device: torch.device | str = "cpu") -> ClipEncoder:
    """A `CLIPModel` folder with its preprocessor config and tokenizer files -> eval-mode encoder."""
    local_dir = Path(local_dir)
    _require(local_dir, "CLIP", ("config.json", "preprocessor_config.json"))
    if not any(all((local_dir / n).is_file() for n in names) for names in TOKENIZER_FILES):
        raise FileNotFoundError(f"CLIP directory {local_dir} has no tokenizer.json (or vocab.json + merges.txt)")
    sha256, per_file = weights_sha256(local_dir)
    model = CLIPModel.from_pretrained(local_dir, local_files_only=True).eval().requires_grad_(False).to(device)
    return ClipEncoder(
        model=model,
        image_processor=CLIPImageProcessorPil.from_pretrained(local_dir, local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(local_dir, local_files_only=True),
        sha256=sha256,
        weight_sha256=per_file,
    )


# ---------------------------------------------------------------------------------------------
# CLAP
# ---------------------------------------------------------------------------------------------


def _mono_waveforms(waveforms: Tensor | np.ndarray | list) -> list[Tensor]:
    """(N, T) array or a list of 1-D clips (lengths may differ) -> list of float32 1-D tensors."""
    clips = list(waveforms) if isinstance(waveforms, list) else list(torch.as_tensor(waveforms))
    clips = [torch.as_tensor(c, dtype=torch.float32).cpu() for c in clips]
    for i, clip in enumerate(clips):
        if clip.ndim != 1 or clip.numel() == 0:
            raise ValueError(f"CLAP expects mono clips (1-D, non-empty); clip {i} has shape {tuple(clip.shape)}")
    return clips


@dataclass
class ClapEncoder:
    model: ClapModel
    feature_extractor: ClapFeatureExtractor
    sha256: str
    weight_sha256: dict[str, str]

    @torch.no_grad()
    def embed(self, waveforms: Tensor | np.ndarray | list, sample_rate: int, seed: int = 0) -> Tensor:
        """Mono clips at `sample_rate` -> (N, projection_dim) float32 unit-norm audio embeddings.

        Clips longer than the extractor's `max_length_s` are cut by its `truncation` mode ("rand_trunc" /
        "fusion" pick random crops from numpy's global generator); `seed` makes that choice repeatable and
        the global numpy state is restored afterwards.
        """
        rate = self.feature_extractor.sampling_rate
        clips = _mono_waveforms(waveforms)
        if sample_rate != rate:
            import torchaudio  # lazily, as selfflow.data.raw does: only CLAP needs it

            clips = [torchaudio.functional.resample(c, orig_freq=sample_rate, new_freq=rate) for c in clips]
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            inputs = self.feature_extractor([c.numpy() for c in clips], sampling_rate=rate, return_tensors="pt")
        finally:
            np.random.set_state(state)
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        with ieee_fp32():
            return self.model.get_audio_features(**inputs).pooler_output.float()


def load_clap(local_dir: str | Path, device: torch.device | str = "cpu") -> ClapEncoder:
    """A `ClapModel` folder with its `ClapFeatureExtractor` config -> eval-mode encoder."""
    local_dir = Path(local_dir)
    _require(local_dir, "CLAP", ("config.json", "preprocessor_config.json"))
    sha256, per_file = weights_sha256(local_dir)
    model = ClapModel.from_pretrained(local_dir, local_files_only=True).eval().requires_grad_(False).to(device)
    extractor = ClapFeatureExtractor.from_pretrained(local_dir, local_files_only=True)
    return ClapEncoder(model=model, feature_extractor=extractor, sha256=sha256, weight_sha256=per_file)


# ---------------------------------------------------------------------------------------------
# REPA targets
# ---------------------------------------------------------------------------------------------

# REPA train.py preprocess_raw_image: DINOv2 (and CLIP, I-JEPA) inputs are resized bicubically to 224.
REPA_DINO_SIZE = 224
DINOV2_TYPES = ("dinov2", "dinov2_with_registers")


def repa_feature_dim(path: str | Path) -> int:
    """The width of the targets `RepaEncoder(path)` gives, read without loading the encoder's weights
    (the built-in feature net is small and is read)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"REPA encoder file not found: {path}")
        return 4 * load_feature_net(path).cfg.width
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"REPA encoder folder missing or without config.json: {path}")
    return int(json.loads((path / "config.json").read_text())["hidden_size"])


class RepaEncoder:
    """Frozen external vision encoder giving REPA's per-token targets, loaded from a local folder.

    Assumes a ViT-like `transformers` model (e.g. ViTModel, Dinov2Model, Dinov2WithRegistersModel):
    `config.image_size` / `config.patch_size` define a square patch grid, `last_hidden_state` is
    `[CLS, registers..., patches in (h w) order]` (for DINOv2 the final-layer-normed tokens, torch hub's
    `x_norm_patchtokens`, which REPA aligns to). Inputs as REPA's `preprocess_raw_image`: images in
    [0, 1], normalised by `preprocessor_config.json`'s `image_mean` / `image_std` when present, else
    ImageNet's, and resized bicubically (`F.interpolate`, no antialiasing) to `image_size`: by default
    224 for DINOv2 (REPA), else `config.image_size`. (REPA normalises before resizing; the two commute,
    as the bicubic weights sum to one.) REPA feeds the dataset's uint8 pixels; here the images are the
    autoencoder's float decode of the clean latent, not quantised.

    A `.safetensors` path is instead the built-in image feature net of `selfflow.eval.builtin_features`
    (the external encoder of REPA on the built-in data): its conv feature maps before pooling,
    resized to the token grid, are the targets.
    """

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        image_size: int | None = None,
    ):
        path = Path(path)
        self.builtin = None
        if path.suffix == ".safetensors":
            self.builtin = load_feature_net(path).to(device)
            self.feature_dim = 4 * self.builtin.cfg.width
            return
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"REPA encoder folder missing or without config.json: {path}")
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device=device, dtype=dtype)
        self.model.eval().requires_grad_(False)
        config = self.model.config
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if (path / "preprocessor_config.json").is_file():
            processor = json.loads((path / "preprocessor_config.json").read_text())
            mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
        self.mean = torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1)
        default_size = REPA_DINO_SIZE if config.model_type in DINOV2_TYPES else int(config.image_size)
        self.image_size = int(image_size or default_size)
        # ViTModel interpolates its position table only when asked; DINOv2 always does.
        accepts = "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
        self.interpolate = accepts and self.image_size != int(config.image_size)
        self.patch_grid = self.image_size // int(config.patch_size)
        self.num_prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # CLS + registers
        self.feature_dim = int(config.hidden_size)

    @torch.no_grad()
    def __call__(self, images: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Patch features `(B, h*w, d)` of images `(B, 3, H, W)` in [-1, 1], resized to the token grid `(h, w)`."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        h, w = grid_hw
        if self.builtin is not None:
            grid = self.builtin.spatial(images.float().to(next(self.builtin.parameters()).device))
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            return rearrange(grid, "b d h w -> b (h w) d")
        x = (images.to(device=self.mean.device, dtype=self.mean.dtype) + 1) / 2  # [0, 1]
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        extra = {"interpolate_pos_encoding": True} if self.interpolate else {}
        hidden = self.model(pixel_values=x, **extra).last_hidden_state[:, self.num_prefix :]  # (B, gh*gw, d)
        g = self.patch_grid
        if hidden.shape[1] != g * g:
            raise ValueError(f"encoder returned {hidden.shape[1]} patch tokens, expected a {g}x{g} grid")
        grid = rearrange(hidden, "b (gh gw) d -> b d gh gw", gh=g, gw=g)
        if (h, w) != (g, g):
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        return rearrange(grid, "b d h w -> b (h w) d")
