"""Audio `(B, channels, samples)` in [-1, 1]: raw waveform, log spectrogram or Oobleck VAE latents, tokens with
ids `(frame, 0, 0, 0)`.

DESIGN.md section 5.
- `RawWaveform`: latent = samples (tiny CPU models); the adapter's token patch is the hop, so a
  token holds `channels * hop` samples.
- `LogSpectrogram`: latent = the log-magnitude STFT (one frame a latent step, `n_fft // 2` bins a
  channel), decoded by Griffin-Lim (torchaudio) - the phase-free CPU representation of TTS systems
  before neural vocoders (Tacotron), for tiny models where the raw waveform's phase is the obstacle.
- `OobleckVAE` (diffusers `AutoencoderOobleck`, configured as the SongBloom VAE: 48 kHz stereo,
  hop 1920 -> 25 latent frames per second, 64 channels). SongBloom does not normalise its
  latents, so per-channel statistics are computed on the training data with
  `compute_latent_stats` (stored with the dataset as json) and applied as `(z - mean) / std`.

    raw = OobleckVAE(path)  # no stats: unnormalised latents
    stats = compute_latent_stats(raw.encode(clip) for clip in clips)
    save_latent_stats(stats, "data/fma/latent_stats.json")
    modality = AudioModality(OobleckVAE(path, stats="data/fma/latent_stats.json"))
"""

import functools
import json
import math
from collections.abc import Iterable, Sequence
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


class AudioAutoencoder(nn.Module):
    """Shared media check of the audio autoencoders: `(B, C, samples)` with samples a multiple of `hop`."""

    modality = "audio"

    def __init__(self, media_channels: int, latent_channels: int, hop: int, sample_rate: int):
        super().__init__()
        self.media_channels = media_channels
        self.latent_channels = latent_channels
        self.hop = hop  # samples per latent frame
        self.sample_rate = sample_rate

    def latent_shape(self, media_shape: Sequence[int]) -> tuple[int, ...]:
        B, _, samples = check_media("audio", media_shape, "(B, C, samples)", self.media_channels)
        if samples % self.hop or samples == 0:
            raise ValueError(f"audio: length {samples} samples is not a multiple of the hop {self.hop}")
        return (B, self.latent_channels, samples // self.hop)


class RawWaveform(Identity, AudioAutoencoder):
    """Identity autoencoder: the latent is the waveform itself (hop 1; the token patch groups samples)."""

    def __init__(self, channels: int = 2, sample_rate: int = 48000):
        super().__init__(channels, channels, 1, sample_rate)


class LogSpectrogram(AudioAutoencoder):
    """Log-magnitude STFT, Hann window of `n_fft` samples, hop `n_fft // 4`; decoded by Griffin-Lim.

    Latent `(B, C * n_fft // 2, samples // hop)`: per media channel the bins 0 .. n_fft/2 - 1 (the
    Nyquist bin is dropped and decoded as silence), frame k centred on sample k * hop (torch.stft's
    centred frames without the last one, which is centred on the clip's end and decoded as silence).
    Magnitudes are scaled so that a full-scale sinusoid peaks at 0 dB, floored at -100 dB and mapped
    linearly to [-1, 1] (`db / 50 + 1`), so silence is -1 as the raw autoencoders' black is.

    Sources: none in the paper (its audio runs on Oobleck latents). Unknown, chosen because the raw
    waveform's phase left the demo's audio unlearned at every budget measured (README, "The demo's
    budget"); the magnitude is phase-free and a tone is one bright row of bins. n_fft 512 at 16 kHz
    (32 ms; 31 Hz bins): 128 built-in clips encoded and decoded (Griffin-Lim, 32 iterations, torchaudio's
    momentum 0.99, random initial phases) keep pitch 0.98, onsets, timbre and tempo 1.00 under the caption
    checker (2026-12-07); zero initial phases 0.96 (Griffin-Lim pulls a tone between two bins towards one);
    n_fft 1024 pitch 1.00 but onsets 0.91-0.92 (hop 128 or 256); n_fft 256 pitch 0.86.
    """

    FLOOR_DB = -100.0
    GRIFFIN_LIM_ITERS = 32  # torchaudio's default
    N_FFT = 512

    def __init__(self, channels: int = 1, sample_rate: int = 16000, n_fft: int = N_FFT):
        if n_fft < 8 or n_fft % 4:
            raise ValueError(f"audio: stft n_fft must be a multiple of 4 and >= 8, got {n_fft}")
        super().__init__(channels, channels * (n_fft // 2), n_fft // 4, sample_rate)
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def encode(self, media: Tensor) -> Tensor:
        B, C = self.latent_shape(media.shape)[0], self.media_channels
        spec = torch.stft(media.float().flatten(0, 1), self.n_fft, self.hop, window=self.window, return_complex=True)
        magnitude = spec.abs()[:, : self.n_fft // 2, :-1] / (self.n_fft / 4)  # a full-scale sine peaks at 1
        db = 20 * torch.log10(magnitude.clamp_min(10 ** (self.FLOOR_DB / 20)))
        return (db / -self.FLOOR_DB * 2 + 1).reshape(B, C * (self.n_fft // 2), -1)

    def decode(self, latent: Tensor) -> Tensor:
        from torchaudio.functional import griffinlim  # here: only decoding needs it

        B, bins = len(latent), self.n_fft // 2
        db = (latent.float() - 1) / 2 * -self.FLOOR_DB
        magnitude = torch.where(db > self.FLOOR_DB, 10 ** (db / 20), 0.0) * (self.n_fft / 4)  # the floor is silence
        magnitude = nn.functional.pad(magnitude.reshape(B * self.media_channels, bins, -1), (0, 1, 0, 1))
        samples = (magnitude.shape[-1] - 1) * self.hop
        # Griffin-Lim draws its initial phases from the latent device's default generator: seed that one
        # generator, inside a fork that gives the caller back its state
        with torch.random.fork_rng(devices=[latent.device] if latent.is_cuda else []):
            if latent.is_cuda:
                with torch.cuda.device(latent.device):
                    torch.cuda.manual_seed(0)
            else:
                torch.default_generator.manual_seed(0)
            wave = griffinlim(
                magnitude,
                self.window,
                self.n_fft,
                self.hop,
                self.n_fft,
                power=1.0,
                n_iter=self.GRIFFIN_LIM_ITERS,
                momentum=0.99,
                length=samples,
                rand_init=True,
            )
        return wave.reshape(B, self.media_channels, samples).clamp(-1, 1)


class OobleckVAE(AudioAutoencoder):
    """Stable-audio Oobleck VAE: posterior mean, then `(z - mean) / std` with data statistics (None: unnormalised)."""

    def __init__(self, path: str | Path, stats: dict | str | Path | None = None):
        from diffusers import AutoencoderOobleck  # here: diffusers takes seconds to import

        vae = load_pretrained(AutoencoderOobleck, path, "audio")
        cfg = vae.config
        hop = int(math.prod(cfg.downsampling_ratios))
        super().__init__(cfg.audio_channels, cfg.decoder_input_channels, hop, cfg.sampling_rate)
        self.vae = vae
        C = self.latent_channels
        stats = load_latent_stats(stats, C) if stats is not None else {"mean": [0.0] * C, "std": [1.0] * C}
        self.register_buffer("mean", torch.tensor(stats["mean"], dtype=torch.float32).view(1, C, 1), persistent=False)
        self.register_buffer("std", torch.tensor(stats["std"], dtype=torch.float32).view(1, C, 1), persistent=False)

    def encode(self, media: Tensor) -> Tensor:
        self.latent_shape(media.shape)
        return encode_normalised(self.vae, media, self.mean, self.std)

    def decode(self, latent: Tensor) -> Tensor:
        return decode_normalised(self.vae, latent, self.mean, self.std)


def compute_latent_stats(latents: Iterable[Tensor]) -> dict[str, list[float]]:
    """Per-channel mean and (population) std over every `(B, C, T)` chunk, merged in float64."""
    return stats_from_moments([latent_moments(latents)])


Moments = tuple[int, Tensor | None, Tensor | None]  # (count, mean, sum of squared deviations) per channel


def latent_moments(latents: Iterable[Tensor]) -> Moments:
    """Per-channel `(n, mean, M2)` of `(B, C, T)` chunks in float64; those of several processes (or
    shards) combine with `stats_from_moments`."""
    moments: Moments = (0, None, None)
    for chunk in latents:
        if chunk.ndim != 3:
            raise ValueError(f"audio: latent chunks must be (B, C, T), got shape {tuple(chunk.shape)}")
        x = chunk.detach().to("cpu", torch.float64).transpose(0, 1).reshape(chunk.shape[1], -1)  # (C, B*T)
        if x.shape[1]:
            mean = x.mean(dim=1)
            moments = _merge(moments, (x.shape[1], mean, ((x - mean[:, None]) ** 2).sum(dim=1)))
    return moments


def _merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise update: `mean = mean_a + d * n_b / n`, `M2 = M2_a + M2_b + d^2 n_a n_b / n`
    with `d = mean_b - mean_a` (no cancellation when the mean is large against the spread)."""
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = a, b
    if mean_a is None or not n_b:
        return b if mean_a is None else a
    if mean_b.shape != mean_a.shape:
        raise ValueError(f"audio: latent chunk has {mean_b.numel()} channels, earlier chunks {mean_a.numel()}")
    delta, n = mean_b - mean_a, n_a + n_b
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta**2 * (n_a * n_b / n)


def stats_from_moments(parts: Iterable[Moments]) -> dict[str, list[float]]:
    """Per-channel mean and population std from the moments of disjoint parts of the latents."""
    n, mean, m2 = functools.reduce(_merge, parts, (0, None, None))
    if mean is None:
        raise ValueError("audio: no latents to compute statistics from")
    return {"mean": mean.tolist(), "std": (m2 / n).sqrt().tolist()}


def save_latent_stats(stats: dict[str, list[float]], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"mean": list(stats["mean"]), "std": list(stats["std"])}, indent=1))


def load_latent_stats(stats: dict | str | Path, channels: int) -> dict[str, list[float]]:
    """Stats from a dict or a json file; a `ValueError` unless both lists have `channels` entries and std > 0."""
    if not isinstance(stats, dict):
        if not Path(stats).is_file():
            raise ValueError(f"audio: latent statistics file {str(stats)!r} does not exist")
        stats = json.loads(Path(stats).read_text())
    mean, std = stats.get("mean"), stats.get("std")
    if mean is None or std is None or len(mean) != channels or len(std) != channels:
        raise ValueError(f"audio: latent statistics need 'mean' and 'std' lists of {channels} values")
    if min(std) <= 0:
        raise ValueError("audio: latent statistics have a std <= 0")
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def audio_defaults() -> ModalityDefaults:
    """Mask ratio 0.50 (paper); train shift 0.75 (the public audio samples' names)."""
    return ModalityDefaults(mask_ratio=0.50, timesteps=TimestepConfig("logit_normal", shift=0.75))


class AudioModality(Modality):
    """Latent `(B, C, T')` -> tokens of `C * pt` channels, ids `(frame, 0, 0, 0)`."""

    name = "audio"
    latent_ndim = 3

    def __init__(self, autoencoder: AudioAutoencoder, patch: Sequence[int] = (1,)):
        if len(patch) != 1:
            raise ValueError(f"audio: patch must be (pt,), got {tuple(patch)}")
        super().__init__(autoencoder, patch, audio_defaults())
        self.sample_rate = autoencoder.sample_rate

    @property
    def hop(self) -> int:
        """Samples per token."""
        return self.autoencoder.hop * self.patch[0]

    @property
    def grid_patch(self) -> tuple[int, int, int]:
        return (self.patch[0], 1, 1)

    def grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        return (int(latent_shape[2]), 1, 1)

    def patch_error(self, grid: tuple[int, int, int]) -> str:
        samples = grid[0] * self.autoencoder.hop
        return f"audio: length {samples} samples is not a multiple of the hop {self.hop} (token patch {self.patch[0]})"
