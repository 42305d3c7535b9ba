"""Files people look at: image grids (PNG), videos (GIF, plays in any browser), audio (WAV, and a
picture of the clips' log spectrograms).

The built-in data is tiny (32 px), so pictures are enlarged with nearest-neighbour scaling to
keep pixels honest. `to_uint8` is the one conversion from model media in [-1, 1] to pixels, used
for these files, for the metrics' networks and for the caption checks.

    pixels = to_uint8(images_nchw)                # (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)
    save_grid(pixels_uint8_nhwc, "samples/image_grid.png", columns=8, scale=3)
    save_gif(frames_uint8_thwc, "samples/video_000.gif", fps=8, scale=3)
    save_wav(waveform_cs, 16000, "samples/audio_000.wav")
    save_spectrograms(waveforms_ncs, 16000, "samples/audio_spectrograms.png", columns=4)
"""

from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image
from torch import Tensor

from selfflow.modalities.audio import LogSpectrogram


def to_uint8(media: Tensor) -> np.ndarray:
    """Images `(N, 3, H, W)` or videos `(N, 3, T, H, W)` in [-1, 1] -> uint8 `(N, H, W, 3)` or
    `(N, T, H, W, 3)` on the CPU, by ADM's (and DiT's) `clamp(127.5 x + 128, 0, 255)` cast to uint8.

    The cast truncates, so this is `127.5 (x + 1)` rounded to the nearest integer with halves
    rounded up; it maps the decoder's `p / 127.5 - 1` (`selfflow.data.raw`) back to exactly `p`.
    """
    pixels = torch.clamp(127.5 * media.float() + 128.0, 0, 255).to(torch.uint8)
    return pixels.movedim(1, -1).cpu().numpy()


def enlarge(image: np.ndarray, scale: int) -> Image.Image:
    picture = Image.fromarray(image)
    if scale == 1:
        return picture
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)


def save_grid(pixels: np.ndarray, path: str | Path, columns: int = 8, scale: int = 1, pad: int = 2) -> Path:
    """uint8 `(N, H, W, 3)` as one grid picture, white gaps of `pad` pixels between cells."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"save_grid wants uint8 (N, H, W, 3), got {pixels.dtype} {pixels.shape}")
    n, h, w, _ = pixels.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    grid = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad), (255, 255, 255))
    for i, image in enumerate(pixels):
        grid.paste(enlarge(image, scale), (pad + (i % columns) * cell_w, pad + (i // columns) * cell_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def save_gif(frames: np.ndarray, path: str | Path, fps: int = 8, scale: int = 1) -> Path:
    """uint8 `(T, H, W, 3)` as a looping GIF."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"save_gif wants uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    pictures = [enlarge(frame, scale) for frame in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0)
    return path


def save_wav(waveform: np.ndarray, sample_rate: int, path: str | Path) -> Path:
    """Float `(C, S)` or `(S,)` in [-1, 1] as 16-bit PCM WAV."""
    data = np.asarray(waveform, dtype=np.float32)
    data = data.T if data.ndim == 2 else data
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.clip(data, -1, 1), sample_rate, subtype="PCM_16")
    return path


def save_spectrograms(waveforms: np.ndarray, sample_rate: int, path: str | Path, columns: int = 4) -> Path:
    """Float `(N, C, S)` or `(N, S)` clips as one grid picture of their log spectrograms, in order,
    `columns` to a row: each cell is the channel mean's `LogSpectrogram` (Hann 512, hop 128: one column
    of pixels a hop, one row a bin, 0 Hz at the bottom), -100 dB black to 0 dB (a full-scale sine) white.
    A clip is padded with silence to a whole number of hops."""
    x = torch.as_tensor(np.asarray(waveforms, dtype=np.float32))
    if x.ndim == 2:
        x = x[:, None]
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"save_spectrograms wants float (N, C, S) or (N, S) clips, got {tuple(np.shape(waveforms))}")
    stft = LogSpectrogram(channels=1, sample_rate=sample_rate)
    mono = torch.nn.functional.pad(x.mean(dim=1, keepdim=True), (0, -x.shape[-1] % stft.hop))
    with torch.no_grad():
        gray = to_uint8(stft.encode(mono).flip(1)[:, None])  # (N, bins, frames, 1), low frequencies at the bottom
    return save_grid(np.repeat(gray, 3, axis=-1), path, columns=columns)
