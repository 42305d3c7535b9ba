"""`ModalityConfig` -> a `Modality` with its autoencoder: the one place that picks adapter classes by name.

    modality = build_modality(ModalityConfig("audio", "oobleck", path="/models/songbloom-vae",
                                             stats="data/fma/latent_stats.json"))

Defaults per autoencoder (token patch; DESIGN.md sections 4-5): raw image 2x2, SD-VAE 2x2 (SiT/2),
FLUX.2 AE 1x1 (it already patchified 2x2), raw video (1, 2, 2), Wan2.2 (1, 1, 1), Oobleck 1,
raw audio 1920 samples (the SongBloom hop, 25 tokens per second at 48 kHz), log spectrogram one frame.
"""

from dataclasses import dataclass

from selfflow.modalities.audio import AudioModality, LogSpectrogram, OobleckVAE, RawWaveform
from selfflow.modalities.base import Modality
from selfflow.modalities.image import SDVAE, Flux2AE, ImageModality, RawPixels
from selfflow.modalities.video import RawFrames, VideoModality, WanVAE

AUTOENCODERS = {"image": ("raw", "sd_vae", "flux2"), "video": ("raw", "wan"), "audio": ("raw", "stft", "oobleck")}
PRETRAINED = ("sd_vae", "flux2", "wan", "oobleck")  # loaded from a local folder (`path`)
DEFAULT_PATCH = {
    ("image", "raw"): [2, 2],
    ("image", "sd_vae"): [2, 2],
    ("image", "flux2"): [1, 1],
    ("video", "raw"): [1, 2, 2],
    ("video", "wan"): [1, 1, 1],
    ("audio", "raw"): [1920],
    ("audio", "stft"): [1],
    ("audio", "oobleck"): [1],
}
PATCH_AXES = {"image": ("ph", "pw"), "video": ("pt", "ph", "pw"), "audio": ("pt",)}
DEFAULT_CHANNELS = {"image": 3, "video": 3, "audio": 2}
# Training timesteps follow the autoencoder (paper section 4.3): uniform for SD-VAE latents (ImageNet, as
# prior work), logit-normal for FLUX.2 AE, Wan2.2 and SongBloom (Oobleck) latents. Raw media are not in
# the paper: unknown, logit-normal chosen as for the learned latent spaces (this project's earlier default);
# the log spectrogram likewise.
# The adapters' own `defaults` follow the same rule; this table needs no weights loaded.
TIMESTEP_DISTRIBUTION = {
    "raw": "logit_normal",
    "stft": "logit_normal",
    "sd_vae": "uniform",
    "flux2": "logit_normal",
    "wan": "logit_normal",
    "oobleck": "logit_normal",
}


def timestep_distribution(autoencoder: str) -> str:
    """The paper's training timestep distribution for latents of `autoencoder` (a ModalityConfig name)."""
    if autoencoder not in TIMESTEP_DISTRIBUTION:
        raise ValueError(f"unknown autoencoder {autoencoder!r}, known: {sorted(TIMESTEP_DISTRIBUTION)}")
    return TIMESTEP_DISTRIBUTION[autoencoder]


@dataclass
class ModalityConfig:
    name: str = "image"  # image | video | audio
    autoencoder: str = "raw"  # image: raw | sd_vae | flux2; video: raw | wan; audio: raw | stft | oobleck
    path: str | None = None  # local folder of a pretrained autoencoder (config.json + weights)
    patch: list[int] | None = None  # token patch; None: the autoencoder's default above
    stats: str | None = None  # oobleck: json of per-channel latent mean/std (compute_latent_stats)
    channels: int | None = None  # media channels (image/video 3, audio 2); checked against a pretrained AE
    sample_rate: int | None = None  # audio only (48000); checked against a pretrained AE
    n_fft: int | None = None  # stft only: window samples, hop n_fft // 4 (None: LogSpectrogram.N_FFT, 512)

    def __post_init__(self):
        if self.name not in AUTOENCODERS:
            raise ValueError(f"modality name must be one of {tuple(AUTOENCODERS)}, got {self.name!r}")
        if self.autoencoder not in AUTOENCODERS[self.name]:
            choices = AUTOENCODERS[self.name]
            raise ValueError(f"{self.name}: autoencoder must be one of {choices}, got {self.autoencoder!r}")
        if (self.autoencoder in PRETRAINED) != (self.path is not None):
            raise ValueError(f"{self.name}: a path is needed for a pretrained autoencoder and only for one")
        if self.patch is None:
            self.patch = list(DEFAULT_PATCH[self.name, self.autoencoder])
        if len(self.patch) != len(PATCH_AXES[self.name]):
            raise ValueError(f"{self.name}: patch must be [{', '.join(PATCH_AXES[self.name])}], got {self.patch}")
        if any(p < 1 for p in self.patch):
            raise ValueError(f"{self.name}: patch sizes must be >= 1, got {self.patch}")
        if self.stats is not None and self.autoencoder != "oobleck":
            raise ValueError(f"{self.name}: latent stats apply to the oobleck autoencoder only")
        if self.n_fft is not None and self.autoencoder != "stft":
            raise ValueError(f"{self.name}: n_fft applies to the stft autoencoder only")
        if self.channels is not None and self.channels < 1:
            raise ValueError(f"{self.name}: channels must be >= 1, got {self.channels}")
        if self.sample_rate is not None and (self.name != "audio" or self.sample_rate < 1):
            raise ValueError(f"{self.name}: sample_rate is a positive audio setting, got {self.sample_rate}")


def build_modality(cfg: ModalityConfig) -> Modality:
    """The adapter for `cfg`: a visible if/elif over (modality, autoencoder)."""
    channels = cfg.channels or DEFAULT_CHANNELS[cfg.name]
    sample_rate = cfg.sample_rate or 48000
    if cfg.name == "image":
        if cfg.autoencoder == "raw":
            autoencoder = RawPixels(channels)
        elif cfg.autoencoder == "sd_vae":
            autoencoder = SDVAE(cfg.path)
        else:
            autoencoder = Flux2AE(cfg.path)
        modality = ImageModality(autoencoder, cfg.patch)
    elif cfg.name == "video":
        autoencoder = RawFrames(channels) if cfg.autoencoder == "raw" else WanVAE(cfg.path)
        modality = VideoModality(autoencoder, cfg.patch)
    else:
        if cfg.autoencoder == "raw":
            autoencoder = RawWaveform(channels, sample_rate)
        elif cfg.autoencoder == "stft":
            autoencoder = LogSpectrogram(channels, sample_rate, cfg.n_fft or LogSpectrogram.N_FFT)
        else:
            autoencoder = OobleckVAE(cfg.path, cfg.stats)
        modality = AudioModality(autoencoder, cfg.patch)
    if cfg.channels is not None and autoencoder.media_channels != cfg.channels:
        raise ValueError(f"{cfg.name}: autoencoder at {cfg.path!r} takes {autoencoder.media_channels} channels")
    if cfg.sample_rate is not None and autoencoder.sample_rate != cfg.sample_rate:
        raise ValueError(f"audio: autoencoder at {cfg.path!r} runs at {autoencoder.sample_rate} Hz")
    return modality
