"""Modality adapters: media -> latent -> tokens/ids -> latent -> media, on tiny random autoencoders (CPU).

Each diffusers autoencoder is built from a tiny random config, saved to a temporary folder and
loaded back through the adapter, as a real checkpoint folder would be.

    .venv/bin/pytest -q tests/test_modalities.py
"""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, AutoencoderKLWan, AutoencoderOobleck
from einops import rearrange
from tiny_autoencoders import TINY_2D, TINY_OOBLECK, TINY_WAN, WAN_MEAN, WAN_STD

from selfflow.data import synth_audio
from selfflow.eval.captions import score_audio
from selfflow.modalities.audio import OobleckVAE, compute_latent_stats, save_latent_stats
from selfflow.modalities.builder import ModalityConfig, build_modality
from selfflow.modalities.grid import patchify, patchify_3d
from selfflow.modalities.image import SDVAE, Flux2AE, ImageModality


def save(model, folder):
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sd_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save(AutoencoderKL(**TINY_2D), tmp_path_factory.mktemp("sd_vae"))


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**TINY_2D)
    vae.bn.running_mean.copy_(torch.linspace(-1, 1, 16))  # custom statistics, so the test sees them used
    vae.bn.running_var.copy_(torch.linspace(0.5, 3, 16))
    return save(vae, tmp_path_factory.mktemp("flux2"))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save(AutoencoderKLWan(**TINY_WAN), tmp_path_factory.mktemp("wan"))


@pytest.fixture(scope="module")
def oobleck_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save(AutoencoderOobleck(**TINY_OOBLECK), tmp_path_factory.mktemp("oobleck"))


def media(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def shuffled_round_trip(modality, latent):
    """Tokenize, shuffle tokens and ids per sample, scatter: must give back the latent exactly."""
    tokens, ids = modality.tokenize(latent)
    assert tokens.shape[-1] == modality.token_dim and ids.dtype == torch.int64 and ids.shape[-1] == 4
    perm = torch.stack([torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(b)) for b in range(2)])
    tokens_s = torch.gather(tokens, 1, perm[..., None].expand(-1, -1, tokens.shape[-1]))
    ids_s = torch.gather(ids, 1, perm[..., None].expand(-1, -1, 4))
    assert torch.equal(modality.scatter(tokens, ids, latent.shape), latent)
    assert torch.equal(modality.scatter(tokens_s, ids_s, latent.shape), latent)
    return tokens, ids


def assert_covers_once(ids, grid):
    """Every `(t, h, w)` cell of the token grid appears exactly once per sample, `l = 0`."""
    t, h, w = grid
    for row in ids:
        cells = set(map(tuple, row[:, :3].tolist()))
        assert len(cells) == row.shape[0] == t * h * w
        assert cells == {(a, b, c) for a in range(t) for b in range(h) for c in range(w)}
        assert (row[:, 3] == 0).all()


# -- the shared grid tokenizer -----------------------------------------------------------------


def test_patchify_3d_matches_image_patchify():
    latent = torch.randn(2, 4, 6, 8)
    tokens, ids = patchify(latent, 2)
    tokens3, ids3 = patchify_3d(latent[:, :, None], (1, 2, 2))
    assert torch.equal(tokens, tokens3) and torch.equal(ids, ids3)


# -- raw autoencoders: exact round trips ---------------------------------------------------------


def test_raw_image_round_trip():
    modality = build_modality(ModalityConfig("image", "raw", patch=[2, 2]))
    x = media(2, 3, 8, 12)
    assert modality.latent_shape(x.shape) == (2, 3, 8, 12) and modality.token_dim == 12
    latent = modality.encode(x)
    tokens, ids = shuffled_round_trip(modality, latent)
    assert tokens.shape == (2, 24, 12)
    assert_covers_once(ids, (1, 4, 6))
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].flatten())  # token (h=0, w=1) holds (c, p1, p2)
    assert torch.equal(modality.decode(modality.scatter(tokens, ids, latent.shape)), x)


def test_raw_video_round_trip():
    modality = build_modality(ModalityConfig("video", "raw", patch=[2, 2, 2]))
    x = media(2, 3, 6, 4, 8)
    latent = modality.encode(x)
    tokens, ids = shuffled_round_trip(modality, latent)
    assert tokens.shape == (2, 3 * 2 * 4, 3 * 8)
    assert_covers_once(ids, (3, 2, 4))
    assert torch.equal(ids[0, :, 0], torch.arange(3).repeat_interleave(8))  # frame ids in (t h w) order
    assert torch.equal(modality.decode(modality.scatter(tokens, ids, latent.shape)), x)


def test_raw_audio_round_trip():
    modality = build_modality(ModalityConfig("audio", "raw", patch=[16], sample_rate=16000))
    x = media(2, 2, 80)
    latent = modality.encode(x)
    tokens, ids = shuffled_round_trip(modality, latent)
    assert tokens.shape == (2, 5, 32) and modality.hop == 16 and modality.sample_rate == 16000
    assert torch.equal(ids[0], torch.tensor([[f, 0, 0, 0] for f in range(5)]))
    assert torch.equal(tokens[1, 2], x[1, :, 32:48].flatten())  # (c, pt) order
    assert torch.equal(modality.decode(modality.scatter(tokens, ids, latent.shape)), x)


def test_log_spectrogram_keeps_what_the_caption_checker_hears():
    """The stft autoencoder: layout, the dB scale at its two ends, and synthesised clips that keep their notes'
    pitch, onsets and timbre through encode -> tokens -> Griffin-Lim, scored by the independent caption checker
    (Griffin-Lim is not exact: a tone between two bins can be pulled half a semitone, about 2% of clips)."""
    modality = build_modality(ModalityConfig("audio", "stft", channels=1, sample_rate=16000, n_fft=512))
    assert modality.hop == 128 and modality.token_dim == 256
    rng = np.random.default_rng(3)
    clips = [synth_audio.sample_audio_clip(rng, 1.0) for _ in range(16)]
    wave = torch.tensor(np.stack([synth_audio.render_audio(c, 16000, 1)[:, 0] / 32767 for c in clips]))[:, None]
    latent = modality.encode(wave.float())
    assert latent.shape == (16, 256, 125) and latent.min() >= -1 and latent.max() <= 1
    shuffled_round_trip(modality, latent[:2])
    state = torch.random.get_rng_state()
    decoded = modality.decode(latent)
    assert torch.equal(torch.random.get_rng_state(), state)  # Griffin-Lim's seeded phases leave the caller's RNG alone
    assert decoded.shape == wave.shape and decoded.abs().max() <= 1
    assert torch.equal(modality.decode(latent[:2]), decoded[:2])  # deterministic, batch-independent
    scores = [
        score_audio(sound, 16000, {"template": c.template, "timbre": c.timbre, "notes": [vars(n) for n in c.notes]})
        for c, sound in zip(clips, decoded[:, 0].numpy(), strict=True)
    ]
    for attribute in ("pitch", "onsets", "timbre"):
        assert sum(s[attribute] for s in scores) >= 15, (attribute, scores)
    # silence is the -100 dB floor (-1); a full-scale sine centred on bin 64 (2 kHz) reaches 0 dB (+1) there
    assert torch.equal(modality.encode(torch.zeros(1, 1, 1024)), torch.full((1, 256, 8), -1.0))
    sine = torch.sin(2 * torch.pi * 2000 * torch.arange(1024) / 16000)[None, None]
    loud = modality.encode(sine)[0, :, 2:-2]  # frames whose window lies inside the clip
    assert torch.allclose(loud[64], torch.ones(4), atol=1e-3) and loud.argmax(0).eq(64).all()


def test_defaults():
    image, video, audio = (build_modality(ModalityConfig(name)) for name in ("image", "video", "audio"))
    assert (image.defaults.mask_ratio, video.defaults.mask_ratio, audio.defaults.mask_ratio) == (0.25, 0.10, 0.50)
    assert image.defaults.timesteps.distribution == video.defaults.timesteps.distribution == "logit_normal"
    assert (image.defaults.timesteps.shift, video.defaults.timesteps.shift, audio.defaults.timesteps.shift) == (
        1.0,
        1.0,
        0.75,
    )
    assert audio.patch == (1920,) and audio.token_dim == 2 * 1920 and image.token_dim == 12


# -- pretrained autoencoders, loaded from folders ------------------------------------------------


def test_sd_vae(sd_vae_dir):
    modality = build_modality(ModalityConfig("image", "sd_vae", path=sd_vae_dir))
    vae = AutoencoderKL.from_pretrained(sd_vae_dir, local_files_only=True).eval()
    x = media(2, 3, 16, 16)
    latent = modality.encode(x)
    assert latent.shape == modality.latent_shape(x.shape) == (2, 4, 8, 8)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(latent, mean * 0.18215)  # posterior mean, scaled
    assert torch.equal(modality.encode(x), latent)  # deterministic
    tokens, ids = shuffled_round_trip(modality, latent)
    assert tokens.shape == (2, 16, 16) and modality.token_dim == 16
    assert_covers_once(ids, (1, 4, 4))
    out = modality.decode(modality.scatter(tokens, ids, latent.shape))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() <= 1

    sampled = ImageModality(SDVAE(sd_vae_dir, sample_posterior=True, scale=0.5), patch=(2, 2))
    z = sampled.encode(x)
    assert torch.isfinite(z).all() and not torch.allclose(z, mean * 0.5)


def test_flux2_ae(flux2_dir):
    modality = build_modality(ModalityConfig("image", "flux2", path=flux2_dir))
    ae = modality.autoencoder
    assert isinstance(ae, Flux2AE) and ae.eps == 1e-4 and ae.factor == 4 and modality.patch == (1, 1)
    assert torch.equal(ae.vae.bn.running_mean, torch.linspace(-1, 1, 16))  # the saved statistics came back
    x = media(2, 3, 16, 16)
    latent = modality.encode(x)
    assert latent.shape == (2, 16, 4, 4) and modality.token_dim == 16

    vae = AutoencoderKLFlux2.from_pretrained(flux2_dir, local_files_only=True).eval()
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean  # (2, 4, 8, 8)
    # (c, pi, pj) order written out by hand: channel 4c + 2i + j holds pixel (2h + i, 2w + j) of channel c
    patched = torch.empty(2, 16, 4, 4)
    for c in range(4):
        for i in range(2):
            for j in range(2):
                patched[:, 4 * c + 2 * i + j] = mean[:, c, i::2, j::2]
    assert torch.equal(patched, rearrange(mean, "b c (h i) (w j) -> b (c i j) h w", i=2, j=2))
    rm, rv = torch.linspace(-1, 1, 16), torch.linspace(0.5, 3, 16)
    expected = (patched - rm[None, :, None, None]) / torch.sqrt(rv[None, :, None, None] + 1e-4)
    torch.testing.assert_close(latent, expected)

    tokens, ids = shuffled_round_trip(modality, latent)
    assert_covers_once(ids, (1, 4, 4))
    out = modality.decode(modality.scatter(tokens, ids, latent.shape))
    with torch.no_grad():
        reference = vae.decode(mean).sample.clamp(-1, 1)  # decode undoes BatchNorm and the patchify
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_wan_vae(wan_dir):
    modality = build_modality(ModalityConfig("video", "wan", path=wan_dir))
    ae = modality.autoencoder
    assert (ae.media_channels, ae.latent_channels, ae.temporal, ae.spatial) == (3, 4, 4, 8)
    x = media(2, 3, 9, 16, 16)
    latent = modality.encode(x)
    assert latent.shape == modality.latent_shape(x.shape) == (2, 4, 3, 2, 2)  # 9 frames -> 1 + 8/4

    vae = AutoencoderKLWan.from_pretrained(wan_dir, local_files_only=True).eval()
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    m, s = torch.tensor(WAN_MEAN).view(1, 4, 1, 1, 1), torch.tensor(WAN_STD).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latent, (mean - m) / s)

    tokens, ids = shuffled_round_trip(modality, latent)
    assert tokens.shape == (2, 12, 4)
    assert_covers_once(ids, (3, 2, 2))
    assert torch.equal(ids[0, :, 0], torch.arange(3).repeat_interleave(4))
    out = modality.decode(modality.scatter(tokens, ids, latent.shape))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() <= 1

    coarse = build_modality(ModalityConfig("video", "wan", path=wan_dir, patch=[3, 2, 2]))
    tokens, ids = shuffled_round_trip(coarse, latent)
    assert tokens.shape == (2, 1, 48) and ids[0].tolist() == [[0, 0, 0, 0]]


def test_oobleck_with_data_stats(oobleck_dir, tmp_path):
    raw = build_modality(ModalityConfig("audio", "oobleck", path=oobleck_dir))  # no stats: unnormalised
    assert raw.autoencoder.hop == 8 and raw.sample_rate == 48000 and raw.token_dim == 4
    clips = [media(2, 2, 64, seed=s) for s in range(3)]
    stats = compute_latent_stats(raw.encode(clip) for clip in clips)
    save_latent_stats(stats, tmp_path / "stats.json")

    cfg = ModalityConfig("audio", "oobleck", path=oobleck_dir, stats=str(tmp_path / "stats.json"), sample_rate=48000)
    modality = build_modality(cfg)
    latent = modality.encode(clips[0])
    assert latent.shape == (2, 4, 8)
    m, s = torch.tensor(stats["mean"]).view(1, 4, 1), torch.tensor(stats["std"]).view(1, 4, 1)
    torch.testing.assert_close(latent, (raw.encode(clips[0]) - m) / s)
    normalised = torch.cat([modality.encode(clip) for clip in clips]).double()
    torch.testing.assert_close(normalised.mean(dim=(0, 2)), torch.zeros(4, dtype=torch.float64), atol=1e-5, rtol=0)

    tokens, ids = shuffled_round_trip(modality, latent)
    assert torch.equal(ids[1], torch.tensor([[f, 0, 0, 0] for f in range(8)]))
    out = modality.decode(modality.scatter(tokens, ids, latent.shape))
    assert out.shape == clips[0].shape and torch.isfinite(out).all() and out.abs().max() <= 1

    pairs = build_modality(ModalityConfig("audio", "oobleck", path=oobleck_dir, patch=[2]))
    tokens, ids = shuffled_round_trip(pairs, raw.encode(clips[0]))
    assert tokens.shape == (2, 4, 8) and pairs.hop == 16 and ids[0, :, 0].tolist() == [0, 1, 2, 3]


def test_compute_latent_stats_streaming():
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 3, 1), (4, 3, 7), (2, 3, 50), (1, 3, 2)]  # uneven chunks, one of a single frame
    scale = torch.tensor([1.0, 0.01, 5.0], dtype=torch.float64)[:, None]
    # a large offset with a small spread: a one-pass sum of squares would lose every digit of the variance
    chunks = [1e6 + torch.randn(*shape, generator=gen, dtype=torch.float64) * scale for shape in shapes]
    stats = compute_latent_stats(iter(chunks))
    flat = torch.cat([c.transpose(0, 1).reshape(3, -1) for c in chunks], dim=1)  # (C, all frames)
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(stats["mean"], **f64), flat.mean(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(stats["std"], **f64), flat.std(dim=1, correction=0), rtol=1e-7, atol=0)
    whole = compute_latent_stats([flat[None]])
    torch.testing.assert_close(torch.tensor(whole["std"], **f64), torch.tensor(stats["std"], **f64), rtol=1e-7, atol=0)
    float32 = compute_latent_stats((c - 1e6).float() for c in chunks)  # float32 chunks are merged in float64 too
    torch.testing.assert_close(torch.tensor(float32["std"]), torch.tensor(stats["std"]).float(), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="audio: no latents"):
        compute_latent_stats([])


# -- bad input: ValueError naming the modality and the problem ---------------------------------


def test_missing_or_wrong_folders(tmp_path, sd_vae_dir, oobleck_dir):
    with pytest.raises(ValueError, match=r"^image: autoencoder folder .*nowhere.* does not exist"):
        build_modality(ModalityConfig("image", "sd_vae", path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^video: autoencoder folder .*empty.* has no config.json"):
        build_modality(ModalityConfig("video", "wan", path=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match=r"^audio: .* holds a AutoencoderKL, expected a AutoencoderOobleck"):
        build_modality(ModalityConfig("audio", "oobleck", path=sd_vae_dir))
    with pytest.raises(ValueError, match=r"^audio: latent statistics file .* does not exist"):
        OobleckVAE(oobleck_dir, stats=str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match=r"^audio: latent statistics need 'mean' and 'std' lists of 4 values"):
        OobleckVAE(oobleck_dir, stats={"mean": [0.0] * 3, "std": [1.0] * 3})


def test_bad_media(wan_dir, oobleck_dir, sd_vae_dir):
    image = build_modality(ModalityConfig("image", "raw", patch=[2, 2]))
    with pytest.raises(ValueError, match=r"^image: expected 3 channels, got 4"):
        image.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"^image: the token patch \(2, 2\) does not divide"):
        image.encode(torch.zeros(1, 3, 7, 8))
    sd = build_modality(ModalityConfig("image", "sd_vae", path=sd_vae_dir))
    with pytest.raises(ValueError, match=r"^image: resolution 11x16 is not divisible"):
        sd.latent_shape((1, 3, 11, 16))
    with pytest.raises(ValueError, match=r"^image: the token patch .* does not divide the 3x8 latent of a 6x16"):
        sd.latent_shape((1, 3, 6, 16))

    wan = build_modality(ModalityConfig("video", "wan", path=wan_dir))
    with pytest.raises(ValueError, match=r"^video: the Wan VAE needs 4n\+1 frames .*got 8"):
        wan.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match=r"^video: expected 3 channels, got 1"):
        wan.latent_shape((1, 1, 9, 16, 16))
    with pytest.raises(ValueError, match=r"^video: resolution 12x16 is not divisible"):
        wan.latent_shape((1, 3, 9, 12, 16))
    raw_video = build_modality(ModalityConfig("video", "raw", patch=[2, 2, 2]))
    with pytest.raises(ValueError, match=r"^video: 1 latent frames are too few"):
        raw_video.encode(torch.zeros(1, 3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"^video: expected media"):
        raw_video.encode(torch.zeros(1, 3, 4, 4))

    audio = build_modality(ModalityConfig("audio", "oobleck", path=oobleck_dir))
    with pytest.raises(ValueError, match=r"^audio: length 60 samples is not a multiple of the hop 8"):
        audio.encode(torch.zeros(1, 2, 60))
    with pytest.raises(ValueError, match=r"^audio: expected 2 channels, got 1"):
        audio.encode(torch.zeros(1, 1, 64))
    raw_audio = build_modality(ModalityConfig("audio", "raw", patch=[16]))
    with pytest.raises(ValueError, match=r"^audio: length 40 samples is not a multiple of the hop 16"):
        raw_audio.encode(torch.zeros(1, 2, 40))
    with pytest.raises(ValueError, match=r"^audio: expected 4 latent channels, got 3"):
        audio.decode(torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match=r"^audio: autoencoder .* runs at 48000 Hz"):
        build_modality(ModalityConfig("audio", "oobleck", path=oobleck_dir, sample_rate=44100))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="text"), "modality name must be one of"),
        (dict(name="video", autoencoder="sd_vae", path="x"), r"^video: autoencoder must be one of"),
        (dict(name="image", autoencoder="flux2"), r"^image: a path is needed"),
        (dict(name="image", patch=[2]), r"^image: patch must be \[ph, pw\]"),
        (dict(name="audio", patch=[0]), r"^audio: patch sizes must be >= 1"),
        (dict(name="image", stats="s.json"), r"^image: latent stats apply to the oobleck"),
        (dict(name="video", sample_rate=16000), r"^video: sample_rate is a positive audio setting"),
        (dict(name="audio", autoencoder="stft", path="x"), r"^audio: a path is needed for a pretrained"),
        (dict(name="audio", n_fft=512), r"^audio: n_fft applies to the stft autoencoder only"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModalityConfig(**kwargs)
