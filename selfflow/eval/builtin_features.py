"""Small feature networks, trained here on the built-in dataset, for Frechet distances on it.

Inception, I3D and CLAP were trained on natural media and say little about 32x32 coloured shapes or
one-second synthesised notes. So each modality gets a small conv net trained on the built-in data
(`selfflow synth`) to predict the ground-truth attributes its captions state, as multi-label targets
(`attribute_names`): background, colours, shapes, sizes, object count and layout for images;
background, colour, shape, size, direction and speed for videos; template, timbre, pace, pitch
classes and octaves for audio. Its penultimate layer (`feature_dim` values after a GELU) is the
feature for Frechet distances; its attribute head (`attribute_logits`) is there for linear probes.

    from selfflow.eval.builtin_features import load_feature_net, train_feature_net
    path = train_feature_net("image", "data/synth/raw/image", "runs/features/image.safetensors")
    net = load_feature_net(path)
    feats = net.features(images)   # (N, 3, 32, 32) in [-1, 1], as `selfflow.data.raw.decode_image` -> (N, 128)
    net.sha256                     # of the weights file; also in the json beside it

Inputs are what `selfflow.data.raw` decodes: images (N, 3, H, W), videos (N, 3, T, H, W) (the frames
are stacked as channels of a 2D net, so motion shows as a shift between channel groups), audio
(N, C, S) or (N, S) (channels averaged) at the trained sample rate, all float in [-1, 1] and of the
trained shape. Audio first becomes a fixed log spectrogram on a semitone-spaced filterbank. The net:
coordinate maps appended, three 3x3 conv / GroupNorm / GELU blocks (strides 2, 2, 1), mean and max
pooling (over both axes for pictures, so features say what is there while the coordinate maps let
them say where; over time only for spectrograms, whose rows are pitches), a linear layer and a GELU.

Deterministic: the same data, config and seed give the same weights bit for bit on one machine (init
and batch order from the seed, constant data, `num_threads` torch threads while training; oneDNN kernels
may differ between CPU generations). Training reads everything into memory; on the default synth data
(1024 images, 256 videos, 512 clips) 300 steps take about 7 s per modality on one CPU thread.
Saved: `out.safetensors` (state dict) and `out.json` (config, attribute names, sha256 of the weights
file and of the training data).
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from selfflow.data import synth_audio, synth_visual
from selfflow.eval.captions import read_items
from selfflow.files import file_sha256

MODALITIES = ("image", "video", "audio")


@dataclass
class FeatureNetConfig:
    modality: str = "image"
    width: int = 16  # channels of the first conv layer (stride 2); x2 and x4 in the two after it
    feature_dim: int = 128  # the penultimate layer: the feature
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3  # AdamW, cosine decay to lr / 10
    weight_decay: float = 1e-4
    seed: int = 0
    num_threads: int = 1  # torch threads while training: the same count gives the same bits
    # filled from the training data: image [3, H, W], video [3, T, H, W], audio [S]
    input_shape: list[int] = field(default_factory=list)
    sample_rate: int = 16000  # audio only
    n_fft: int = 2048  # audio spectrogram: 7.8 Hz bins and 32 ms hops at 16 kHz
    hop: int = 512
    lowest_midi: int = 40  # audio filterbank: one band per semitone from E2 (82 Hz) ...
    bands: int = 72  # ... to D#8 (~5 kHz)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        for name in ("width", "feature_dim", "steps", "batch_size", "num_threads", "n_fft", "hop", "bands"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------- targets


def attribute_names(modality: str) -> list[str]:
    """The multi-label targets of a modality, as `group:value` (e.g. `color:red`)."""
    if modality == "image":
        layouts = [f"region:{r}" for r in synth_visual.REGIONS] + [f"relation:{r}" for r in synth_visual.RELATIONS]
        return [
            *(f"background:{b}" for b in synth_visual.BACKGROUNDS),
            *(f"color:{c}" for c in synth_visual.PALETTE),
            *(f"shape:{s}" for s in synth_visual.SHAPES),
            *(f"size:{s}" for s in synth_visual.SIZES),
            *(f"objects:{n}" for n in (1, 2, 3)),
            *layouts,
        ]
    if modality == "video":
        return [
            *(f"background:{b}" for b in synth_visual.BACKGROUNDS),
            *(f"color:{c}" for c in synth_visual.PALETTE),
            *(f"shape:{s}" for s in synth_visual.SHAPES),
            *(f"size:{s}" for s in synth_visual.SIZES),
            *(f"direction:{d}" for d in synth_visual.DIRECTIONS),
            *(f"speed:{s}" for s in synth_visual.SPEEDS),
        ]
    if modality == "audio":
        return [
            *(f"template:{t}" for t in synth_audio.TEMPLATES),
            *(f"timbre:{t}" for t in synth_audio.TIMBRE_WORDS),
            *(f"pace:{p}" for p in synth_audio.TEMPOS),
            *(f"pitch:{n}" for n in synth_audio.NOTE_NAMES),
            *(f"octave:{o}" for o in range(2, 7)),  # the synth's notes span A2 .. C6
        ]
    raise ValueError(f"unknown modality {modality!r} (image, video or audio)")


def stated_values(modality: str, attrs: dict) -> set[str]:
    """The `group:value` names an item's attributes (its synth `json`) make true."""
    if modality == "image":
        objects = attrs["objects"]
        layout = (
            f"region:{attrs['groups'][0]['region']}" if attrs["relation"] is None else f"relation:{attrs['relation']}"
        )
        return {
            f"background:{attrs['background']}",
            f"objects:{len(objects)}",
            layout,
            *(f"color:{o['color']}" for o in objects),
            *(f"shape:{o['shape']}" for o in objects),
            *(f"size:{o['size']}" for o in objects),
        }
    if modality == "video":
        keys = ("background", "color", "shape", "size", "direction", "speed")
        return {f"{k}:{attrs[k]}" for k in keys}
    notes = attrs["notes"]
    pace = {f"pace:{attrs['pace']}"} if attrs.get("pace") else set()
    return {
        f"template:{attrs['template']}",
        f"timbre:{attrs['timbre']}",
        *pace,
        *(f"pitch:{synth_audio.NOTE_NAMES[n['midi'] % 12]}" for n in notes),
        *(f"octave:{n['midi'] // 12 - 1}" for n in notes),
    }


def attribute_targets(modality: str, attrs: dict) -> np.ndarray:
    """(A,) float32 0/1 targets in `attribute_names(modality)` order."""
    values = stated_values(modality, attrs)
    names = attribute_names(modality)
    unknown = values - set(names)
    if unknown:
        raise ValueError(f"{modality} item {attrs.get('index')}: attribute values {sorted(unknown)} are not targets")
    return np.array([name in values for name in names], dtype=np.float32)


# ---------------------------------------------------------------- network


def semitone_filterbank(cfg: FeatureNetConfig) -> Tensor:
    """(bands, n_fft // 2 + 1) triangles one semitone wide on each side of each band's pitch, rows summing to 1
    (a band narrower than a bin takes the nearest bin)."""
    freqs = torch.fft.rfftfreq(cfg.n_fft, 1 / cfg.sample_rate, dtype=torch.float64)
    centres = 440.0 * 2.0 ** ((torch.arange(cfg.bands, dtype=torch.float64) + cfg.lowest_midi - 69) / 12)
    distance = 12 * torch.log2(freqs.clamp(min=1e-3)[None, :] / centres[:, None])  # semitones
    weights = (1 - distance.abs()).clamp(min=0)
    rows, nearest = torch.arange(cfg.bands), distance.abs().argmin(dim=1)
    weights[rows, nearest] = weights[rows, nearest].clamp(min=1e-3)
    return (weights / weights.sum(dim=1, keepdim=True)).float()


class AddCoords(nn.Module):
    """Appends y and x coordinate maps in [-1, 1], so pooled features can still say where things are."""

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape  # (N, C, H, W)
        ys = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
        return torch.cat([x, ys, xs], dim=1)


class MeanMaxPool(nn.Module):
    """Mean and max over `dims`, flattened: (N, C, H, W) -> (N, 2 C) over (2, 3), (N, 2 C H) over (3,)."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x.mean(dim=self.dims).flatten(1), x.amax(dim=self.dims).flatten(1)], dim=1)


def conv_block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    """3x3 conv, GroupNorm (per sample, so features do not depend on the batch), GELU."""
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(min(8, c_out), c_out), nn.GELU()]


class BuiltinFeatureNet(nn.Module):
    """A small conv net: (inputs as 2D maps) -> `features` (N, feature_dim) -> `attribute_logits` (N, A)."""

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        if not cfg.input_shape:
            raise ValueError("FeatureNetConfig.input_shape is empty: it is set from the training data")
        self.cfg = cfg
        self.attributes = attribute_names(cfg.modality)
        self.sha256 = ""  # set by load_feature_net
        channels = {"image": 3, "audio": 1}  # audio: one log spectrogram
        in_ch = 3 * cfg.input_shape[1] if cfg.modality == "video" else channels[cfg.modality]  # video: 3 T frames
        w = cfg.width
        # pictures: pooled over both axes (what is there, wherever it is; the coordinate maps keep where);
        # spectrograms: over time only, since a band's row is its pitch
        rows = math.ceil(math.ceil(cfg.bands / 2) / 2) if cfg.modality == "audio" else 1  # after two stride-2 convs
        self.encoder = nn.Sequential(
            AddCoords(),
            *conv_block(in_ch + 2, w, stride=2),
            *conv_block(w, 2 * w, stride=2),
            *conv_block(2 * w, 4 * w, stride=1),
            MeanMaxPool((3,) if cfg.modality == "audio" else (2, 3)),
            nn.Linear(2 * 4 * w * rows, cfg.feature_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(cfg.feature_dim, len(self.attributes))
        if cfg.modality == "audio":
            self.register_buffer("filterbank", semitone_filterbank(cfg), persistent=False)
            self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)

    def maps(self, batch: Tensor) -> Tensor:
        """Checked inputs -> (N, C, H, W): video frames as channels, audio as a log semitone spectrogram."""
        batch = torch.as_tensor(batch, dtype=torch.float32)
        shape = self.cfg.input_shape
        if self.cfg.modality == "audio" and batch.ndim == 3:
            batch = batch.mean(dim=1)  # channels averaged
        if list(batch.shape[1:]) != shape:
            want = ", ".join(map(str, ["N", *shape]))
            raise ValueError(f"{self.cfg.modality} feature net: expected a batch ({want}), got {tuple(batch.shape)}")
        if self.cfg.modality == "image":
            return batch
        if self.cfg.modality == "video":
            return batch.flatten(1, 2)  # (N, 3 T, H, W), channels (c, t)
        spec = torch.stft(batch, self.cfg.n_fft, self.cfg.hop, window=self.window, return_complex=True)
        power = spec.abs().square()  # (N, F, frames)
        return torch.log(self.filterbank @ power + 1e-6).unsqueeze(1)  # (N, 1, bands, frames)

    def forward(self, batch: Tensor) -> Tensor:
        """The features, with gradients: (N, feature_dim)."""
        return self.encoder(self.maps(batch))

    @torch.no_grad()
    def spatial(self, batch: Tensor) -> Tensor:
        """(N, 4 * width, H / 4, W / 4) feature maps before pooling (REPA's per-token targets)."""
        return self.encoder[:-3](self.maps(batch))  # everything up to MeanMaxPool, Linear, GELU

    @torch.no_grad()
    def features(self, batch: Tensor) -> Tensor:
        """(N, feature_dim) float32 features of a batch in [-1, 1], for Frechet distances."""
        return self(batch)

    def attribute_logits(self, batch: Tensor) -> Tensor:
        """(N, A) logits of the attributes `self.attributes` (multi-label: apply a sigmoid)."""
        return self.head(self(batch))


# ---------------------------------------------------------------- data, training, files


def as_inputs(modality: str, media) -> Tensor:
    """One item in `captions.read_items` format -> the network's input layout, float32 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(media))
    if modality == "audio":
        return x.float().reshape(-1)
    x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
    return x.permute(2, 0, 1) if modality == "image" else x.permute(3, 0, 1, 2)  # (3, H, W) / (3, T, H, W)


def training_data(modality: str, data) -> tuple[Tensor, Tensor]:
    """Inputs (N, ...) and targets (N, A) from a shard folder (a modality folder, or the synth root holding
    one) or from `(media, attributes)` items."""
    if isinstance(data, str | Path):
        folder = Path(data) / modality if (Path(data) / modality).is_dir() else Path(data)
        data = read_items(folder, modality)
    items = list(data)
    if not items:
        raise ValueError(f"no {modality} items to train the feature net on")
    inputs = [as_inputs(modality, media) for media, _ in items]
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) > 1:
        raise ValueError(f"{modality} items differ in shape: {sorted(shapes)}")
    targets = np.stack([attribute_targets(modality, attrs) for _, attrs in items])
    return torch.stack(inputs), torch.from_numpy(targets)


def learning_rate(step: int, cfg: FeatureNetConfig) -> float:
    """Cosine decay from `lr` to `lr / 10` over the run."""
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(cfg.steps, 1))))


def sidecar(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def fit(net: BuiltinFeatureNet, inputs: Tensor, targets: Tensor, cfg: FeatureNetConfig) -> float:
    """Train `net` in place with AdamW on random batches from the seed; returns the last batch's loss."""
    with torch.no_grad():  # the input maps (spectrograms for audio) have no parameters: compute them once
        maps = torch.cat([net.maps(chunk) for chunk in inputs.split(256)])
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss = torch.zeros(())
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        idx = torch.randint(len(inputs), (min(cfg.batch_size, len(inputs)),), generator=gen)
        loss = F.binary_cross_entropy_with_logits(net.head(net.encoder(maps[idx])), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def train_feature_net(
    modality: str,
    shard_dir_or_items,
    out_path: str | Path,
    steps: int | None = None,
    seed: int | None = None,
    cfg: FeatureNetConfig | None = None,
) -> Path:
    """Train the feature net of `modality` on the built-in data; write `out_path` (safetensors) and its json.

    `shard_dir_or_items`: a folder of raw synth shards (`.../raw/image` or `.../raw`) or `(media,
    attributes)` items as `captions.read_items` gives them. `steps` and `seed` override `cfg`'s.
    """
    cfg = cfg or FeatureNetConfig(modality=modality)
    if cfg.modality != modality:
        raise ValueError(f"train_feature_net: modality {modality!r} but cfg.modality is {cfg.modality!r}")
    cfg = replace(cfg, steps=cfg.steps if steps is None else steps, seed=cfg.seed if seed is None else seed)
    inputs, targets = training_data(modality, shard_dir_or_items)
    cfg.input_shape = list(inputs.shape[1:])
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
            torch.manual_seed(cfg.seed)
            net = BuiltinFeatureNet(cfg)
            final_loss = fit(net.train(), inputs, targets, cfg)
    finally:
        torch.set_num_threads(threads)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    data_hash = hashlib.sha256(inputs.numpy().tobytes() + targets.numpy().tobytes()).hexdigest()
    record = {
        "format": "selfflow-builtin-features-1",
        "config": asdict(cfg),
        "attributes": net.attributes,
        "sha256": file_sha256(out),
        "data": {"items": len(inputs), "sha256": data_hash},
        "final_loss": final_loss,
    }
    sidecar(out).write_text(json.dumps(record, indent=2) + "\n")
    return out


def load_feature_net(path: str | Path) -> BuiltinFeatureNet:
    """The trained net of `path` (its .safetensors, with the .json beside it), in eval mode, `sha256` set."""
    path = Path(path)
    weights = path.with_suffix(".safetensors") if path.suffix == ".json" else path
    for p in (weights, sidecar(weights)):
        if not p.is_file():
            raise FileNotFoundError(f"builtin feature net: {p} does not exist")
    record = json.loads(sidecar(weights).read_text())
    if record.get("format") != "selfflow-builtin-features-1":
        raise ValueError(f"{sidecar(weights)} is not a builtin feature net record (format {record.get('format')!r})")
    digest = file_sha256(weights)
    if digest != record["sha256"]:
        raise ValueError(f"{weights}: sha256 {digest} differs from {record['sha256']} in {sidecar(weights)}")
    net = BuiltinFeatureNet(FeatureNetConfig(**record["config"]))
    net.load_state_dict(load_file(str(weights)), strict=True)
    net.sha256 = digest
    return net.eval()
