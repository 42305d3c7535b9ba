"""Inception-v3 features for FID, sFID, IS and precision/recall, in the ADM evaluator's conventions.

The ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`) runs the TF graph
`classify_image_graph_def.pb` (inception-2015-12-05): NHWC images in [0, 255] are fed at `ExpandDims:0`,
the graph resizes them to 299x299 with TF1 `ResizeBilinear` (align_corners=False, no half-pixel
centres), subtracts 128 and multiplies by 1/128, and the evaluator reads

- `pool_3:0`: the 2048-d average pool, for FID and precision/recall;
- `mixed_6/conv:0`: the ReLU output of the 1x1 branch of the 7th mixed block (17x17x192), of which it
  keeps the first 7 channels (`spatial[..., :7]`) and flattens them in NHWC order: 7*17*17 = 2023 dims,
  for sFID;
- `softmax/logits/MatMul`'s weight, multiplied with pool_3 **without the bias** and soft-maxed, for IS.

This module is that network in PyTorch with the parameter names of the pytorch-fid port
(mseitzer/pytorch-fid `inception.py`: torchvision's `Inception3` names, `FIDInceptionA/C/E_1/E_2`
blocks, 1008 classes, BatchNorm eps 0.001), so `pt_inception-2015-12-05-6726825d.pth` loads unchanged
with strict=True. TF names map to ours as in toshas/torch-fidelity `utils/util_convert_inception_weights.py`
(`mixed` -> Mixed_5b, ..., `mixed_6` -> Mixed_6d, `mixed_10` -> Mixed_7c; `mixed_6/conv` ->
`Mixed_6d.branch1x1`), so the sFID features are `Mixed_6d.branch1x1`'s output.

    inception = load_inception("/ckpt/pt_inception-2015-12-05-6726825d.pth", device="cuda")
    feats = inception.embed(images_uint8_nhwc)    # InceptionFeatures: pool (N, 2048), spatial (N, 2023),
    inception.sha256, inception.matches_reference  # logits (N, 1008) unbiased, as ADM's IS uses them
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfflow.files import file_sha256

PT_FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
# sha256 of the pytorch-fid / torch-fidelity port of inception-2015-12-05. Its first 8 hex digits are the
# `6726825d` in the file name (torch.hub's hash-prefix convention); the full digest is as recorded in a
# public project's notes for torch-fidelity's copy of the same file, not re-derived here.
PT_FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the 2015 graph's softmax has 1008 outputs (pytorch-fid `fid_inception_v3`)
SPATIAL_CHANNELS = 7  # ADM evaluator: `spatial[..., :7]`
BN_EPS = 0.001  # TF graph value, kept by torchvision's BasicConv2d and pytorch-fid


# ---------------------------------------------------------------------------------------------
# Input pipeline: TF1 ResizeBilinear and the graph's (x - 128) / 128
# ---------------------------------------------------------------------------------------------


def _tf1_axis(in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices and weights of TF1 legacy bilinear resize along one axis (align_corners=False).

    tensorflow/core/kernels/image/resize_bilinear_op.cc `compute_interpolation_weights` with
    `LegacyScaler`: in = out_index * scale, scale = float(in_size) / out_size (float32 throughout),
    lower = floor(in), upper = min(ceil(in), in_size - 1), lerp = in - floor(in).
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    floor = torch.floor(src)
    lower = floor.long().clamp(min=0)
    upper = torch.ceil(src).long().clamp(max=in_size - 1)
    return lower.to(device), upper.to(device), (src - floor).to(device)


def tf1_resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize (N, C, H, W) float32 like TF1 `tf.image.resize_bilinear(align_corners=False)`.

    Unlike `F.interpolate(mode="bilinear", align_corners=False)` there are no half-pixel centres: output
    pixel i samples input position i * in / out. Interpolates along x first, then y, in float32, as TF's
    `compute_lerp` does.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"tf1_resize_bilinear expects a float (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    y_lo, y_hi, y_lerp = _tf1_axis(x.shape[2], size[0], x.device)
    x_lo, x_hi, x_lerp = _tf1_axis(x.shape[3], size[1], x.device)
    x = x.float()
    top, bottom = x[:, :, y_lo], x[:, :, y_hi]  # (N, C, out_h, W)
    x_lerp = x_lerp.view(1, 1, 1, -1)
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * x_lerp
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * x_lerp
    return top + (bottom - top) * y_lerp.view(1, 1, -1, 1)


def preprocess(images: Tensor | np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """(N, H, W, 3) uint8 or float images on the [0, 255] scale -> (N, 3, 299, 299) network input.

    Floats are read on the same 0..255 scale as uint8 (the ADM evaluator feeds `batch.astype(float32)`).
    The graph's `Sub` 128 then `Mul` 0.0078125 equals (x - 128) / 128 exactly (1/128 is a power of two;
    torch-fidelity `feature_extractor_inceptionv3.py` notes the same).
    """
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"Inception expects images of shape (N, H, W, 3), got {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2)
    x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128) / 128


# ---------------------------------------------------------------------------------------------
# The network (torchvision Inception3 layout, pytorch-fid's TF-compatible block variants)
# ---------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps 0.001) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3/1 SAME average pool that, like TF, leaves the zero padding out of the mean (pytorch-fid patch)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def branches(self, x: Tensor) -> list[Tensor]:
        """The four branch outputs before concatenation; [0] is the 1x1 branch (TF `mixed_N/conv`)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return [self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (Mixed_7b, Mixed_7c).

    `max_pool`: the pool branch of the graph's last block (Mixed_7c) max-pools where the paper and
    torchvision average-pool (pytorch-fid `FIDInceptionE_2`); Mixed_7b averages (`FIDInceptionE_1`).
    """

    def __init__(self, in_channels: int, max_pool: bool = False) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


@dataclass
class InceptionFeatures:
    pool: Tensor  # (N, 2048) pool_3: FID, precision/recall
    spatial: Tensor  # (N, 2023) mixed_6/conv[..., :7] flattened (h, w, c): sFID
    logits: Tensor  # (N, 1008) pool_3 @ W without bias (ADM `_create_softmax_graph`): IS


class InceptionV3(nn.Module):
    """The inception-2015-12-05 graph with pytorch-fid parameter names; takes `preprocess` output."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def forward(self, x: Tensor) -> InceptionFeatures:
        if x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"InceptionV3 expects (N, 3, 299, 299) from `preprocess`, got {tuple(x.shape)}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS]  # TF mixed_6/conv: (N, 192, 17, 17), first 7 channels
        x = self.Mixed_6e(torch.cat(branches, 1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # pool_3: 8x8 average
        return InceptionFeatures(
            pool=pool,
            spatial=spatial.permute(0, 2, 3, 1).flatten(1),  # NHWC order, as ADM reshapes the TF tensor
            logits=pool @ self.fc.weight.T,  # fc.bias loaded but unused: ADM; torch-fidelity `logits_unbiased`
        )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """Run float32 convolutions and matmuls in full IEEE precision (no TF32) inside, restoring the settings.

    PyTorch lets cuDNN use TF32 for float32 convolutions by default; the reference features (TF graph, the
    pytorch-fid port) are float32, so evaluation networks run without it.
    """
    conv, matmul = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = conv, matmul


@dataclass
class InceptionExtractor:
    net: InceptionV3
    path: str
    sha256: str  # of the loaded weight file; written next to every metric

    @property
    def matches_reference(self) -> bool:
        """Whether the weights are the pytorch-fid port of the TF graph that ADM's numbers come from."""
        return self.sha256 == PT_FID_WEIGHTS_SHA256

    @torch.no_grad()
    def embed(self, images: Tensor | np.ndarray) -> InceptionFeatures:
        """(N, H, W, 3) images on the [0, 255] scale -> float32 features, computed in IEEE float32 (no TF32)."""
        with ieee_fp32():
            return self.net(preprocess(images, next(self.net.parameters()).device))


def load_inception(
    path: str | Path, device: torch.device | str = "cpu", expected_sha256: str | None = None
) -> InceptionExtractor:
    """Load the FID Inception from a local `.pth` state dict (pytorch-fid names), strict, in eval mode.

    The file's sha256 is always computed and kept on the result; with `expected_sha256` (e.g.
    `PT_FID_WEIGHTS_SHA256`) a different file is a ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {path}. Expected the pytorch-fid port {PT_FID_WEIGHTS_NAME} "
            f"(sha256 {PT_FID_WEIGHTS_SHA256}) saved locally; nothing is downloaded."
        )
    sha256 = file_sha256(path)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise ValueError(f"Inception weights {path} have sha256 {sha256}, expected {expected_sha256}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = InceptionV3()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"Inception weights {path} do not match the pytorch-fid layout: {err}") from err
    net.eval().requires_grad_(False).to(device)
    return InceptionExtractor(net=net, path=str(path), sha256=sha256)
