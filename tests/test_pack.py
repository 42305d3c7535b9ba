"""`selfflow pack`: a folder of files a user has -> raw shards that `selfflow prepare` encodes.

The folder is written here with PIL, PyAV and soundfile; the shards are read back with the
project's raw reader and checked against what was written (sizes, frame counts, durations,
captions, labels, skip reasons)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from selfflow.cli import main
from selfflow.data.pack import PackConfig, fit_size, pack
from selfflow.data.raw import decode_audio, decode_image, decode_video, read_shard
from selfflow.data.synth_visual import encode_mp4, pick_video_codec


def write_image(path: Path, size: tuple[int, int], colour=(200, 30, 30), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def write_video(path: Path, frames: int, fps: int, size=(64, 48)) -> None:
    pixels = np.zeros((frames, size[1], size[0], 3), np.uint8)
    pixels[..., 1] = np.arange(frames, dtype=np.uint8)[:, None, None] * 8  # frame i is green 8 i
    path.write_bytes(encode_mp4(pixels, fps, pick_video_codec()))


def write_wav(path: Path, seconds: float, rate: int, channels: int = 2) -> None:
    t = np.arange(round(seconds * rate)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(path, np.stack([tone] * channels, axis=1), rate, format="WAV")


def samples(folder: Path) -> list[dict]:
    return [s for shard in sorted(folder.glob("*.tar")) for s in read_shard(shard)]


def test_a_captioned_folder_becomes_raw_shards_within_limits(tmp_path):
    src = tmp_path / "mine"
    write_image(src / "a_red.png", (300, 200))
    (src / "a_red.txt").write_text("a red square\n")
    write_image(src / "big.jpg", (8000, 8000), (0, 0, 250), "JPEG")  # the 896 MB latent of the issue
    (src / "big.txt").write_text("a blue photo")
    write_image(src / "nocaption.png", (40, 40))
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    (src / "broken.txt").write_text("broken")
    write_video(src / "clip.mp4", frames=24, fps=24)  # one second at 24 fps
    (src / "clip.txt").write_text("a clip getting greener")
    write_wav(src / "tone.wav", seconds=3.0, rate=44100)
    (src / "tone.txt").write_text("a 440 Hz tone")
    out = tmp_path / "raw"
    cfg = PackConfig(
        src=str(src), out_dir=str(out), image_size=64, video_size=32, fps=8, max_frames=5,
        sample_rate=16000, audio_channels=1, max_seconds=2.0, workers=1,
    )  # fmt: skip
    summary = pack(cfg)

    images = {json.loads(s["json"])["source"]: s for s in samples(out / "image")}
    assert sorted(images) == ["a_red.png", "big.jpg"]
    red = decode_image(images["a_red.png"]["png"])
    assert red.shape == (3, 64, 64)  # shorter side 200 -> 64, centre crop
    assert images["a_red.png"]["txt"] == b"a red square"
    big = decode_image(images["big.jpg"]["jpg"])
    assert big.shape == (3, 64, 64) and big[2].mean() > 0.9  # still blue, 64 px, never 8000
    assert json.loads(images["big.jpg"]["json"])["resized_from"] == [8000, 8000]
    assert summary["reasons"]["no caption"]["examples"] == ["nocaption.png"]
    assert summary["reasons"]["does not decode (UnidentifiedImageError)"]["examples"] == ["broken.png"]
    assert summary["skipped"] == 2 and summary["modalities"]["image"]["resized"] == 2

    (clip,) = samples(out / "video")
    video = decode_video(clip["mp4"])
    assert video.shape == (3, 5, 32, 32)  # frames at 0 .. 23/24 s: 8 ticks of 1/8 s, cut to max_frames 5
    green = ((video[1, :, 16, 16] + 1) * 127.5).round()
    assert green.tolist() == pytest.approx([0, 24, 48, 72, 96], abs=6)  # frames 0, 3, 6, 9, 12 of 24 fps
    meta = json.loads(clip["json"])
    assert meta["cut_from"] == 8 and meta["fps"] == 8

    (tone,) = samples(out / "audio")
    wave = decode_audio(tone["flac"], 1, 16000)
    assert wave.shape == (1, 32000)  # 3 s at 44.1 kHz stereo -> 2 s at 16 kHz mono
    spectrum = np.abs(np.fft.rfft(wave[0].numpy()))
    assert np.argmax(spectrum) / 2.0 == pytest.approx(440, abs=1)  # bins of 0.5 Hz
    assert json.loads(tone["json"])["resampled_from"] == 44100
    written = json.loads((out / "summary.json").read_text())
    assert written["modalities"]["audio"] == {"written": 1, "resized": 0, "cut": 1, "shards": 1}


def test_class_folders_are_numbered_as_imagefolder_does_and_captions_come_from_a_csv(tmp_path):
    src = tmp_path / "tree"
    for cls, n in (("n02", 2), ("n01", 3)):  # sorted names: n01 -> 0, n02 -> 1
        for i in range(n):
            write_image(src / cls / f"{i}.JPEG", (48, 40), (10 * i, 0, 0), "JPEG")
    out = tmp_path / "raw"
    assert main(["pack", f"src={src}", f"out_dir={out}", "class_folders=true", "image_size=32", "workers=2"]) == 0
    got = sorted(
        (json.loads(s["json"])["source"], json.loads(s["json"])["label"], s["txt"]) for s in samples(out / "image")
    )
    assert got == [(f"n01/{i}.JPEG", 0, b"n01") for i in range(3)] + [(f"n02/{i}.JPEG", 1, b"n02") for i in range(2)]
    assert json.loads((out / "classes.json").read_text()) == {"n01": 0, "n02": 1}

    flat = tmp_path / "flat"
    rows = [("cat.png", "a cat", "cat"), ("dog.png", "a dog", "dog"), ("cat2.png", "another cat", "cat")]
    for name, _, _ in rows:
        write_image(flat / name, (32, 32))
    write_image(flat / "unlisted.png", (32, 32))
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "caption", "class"), *rows])
    summary = pack(
        PackConfig(
            src=str(flat),
            out_dir=str(tmp_path / "raw2"),
            captions=str(tmp_path / "captions.csv"),
            image_size=32,
            workers=1,
        )
    )
    got = {
        json.loads(s["json"])["source"]: (s["txt"].decode(), json.loads(s["json"])["label"])
        for s in samples(tmp_path / "raw2" / "image")
    }
    assert got == {"cat.png": ("a cat", 0), "dog.png": ("a dog", 1), "cat2.png": ("another cat", 0)}
    assert summary["reasons"] == {"not listed in captions": {"count": 1, "examples": ["unlisted.png"]}}


def test_bad_caption_files_and_settings_are_named(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.png", (32, 32))
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"path": "a.png", "caption": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"captions\.jsonl line 2 is not JSON"):
        pack(PackConfig(src=str(src), out_dir=str(tmp_path / "o"), captions=str(bad), workers=1))
    missing = tmp_path / "c.csv"
    missing.write_text("file,text\na.png,x\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['caption', 'path'\]"):
        pack(PackConfig(src=str(src), out_dir=str(tmp_path / "o"), captions=str(missing), workers=1))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        pack(PackConfig(src=str(tmp_path / "nope"), out_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="image_size must be an even number"):
        PackConfig(src=str(src), image_size=33)
    assert not (tmp_path / "o").exists()  # nothing written for bad input
    (src / "a.txt").write_text("a caption")
    pack(PackConfig(src=str(src), out_dir=str(tmp_path / "o"), workers=1))
    before = (tmp_path / "o" / "image" / "shard-000000.tar").read_bytes()
    with pytest.raises(FileExistsError, match="already holds shards"):
        pack(PackConfig(src=str(src), out_dir=str(tmp_path / "o"), workers=1, image_size=16))
    assert (tmp_path / "o" / "image" / "shard-000000.tar").read_bytes() == before  # untouched


def test_fit_size_caps_pixels_and_keeps_even_sides():
    assert fit_size(300, 200, 64, 10**9) == (96, 64, True)
    width, height, crop = fit_size(8000, 6000, None, 4096 * 4096)
    assert width * height <= 4096 * 4096 and width % 2 == height % 2 == 0 and not crop
    assert fit_size(640, 480, None, 4096 * 4096) == (640, 480, False)


def test_packed_shards_prepare_into_latents(tmp_path):
    """The packed folder is `selfflow prepare`'s raw_dir as it is."""
    src = tmp_path / "src"
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        write_image(src / f"{i}.png", (40, 40), colour)
        (src / f"{i}.txt").write_text(f"colour number {i}")
    raw, latents = tmp_path / "raw", tmp_path / "latents"
    assert main(["pack", f"src={src}", f"out_dir={raw}", "image_size=16", "workers=1"]) == 0
    prepare = ["prepare", f"raw_dir={raw}", f"out_dir={latents}", "modalities.video=null", "modalities.audio=null"]
    assert main([*prepare, "workers=1", "vocab_size=12", "sentencepiece_type=word"]) == 0
    manifest = json.loads((latents / "manifest.json").read_text())
    assert manifest["modalities"]["image"]["count"] == 4
    assert manifest["modalities"]["image"]["latent_shape"] == [3, 16, 16]
    assert manifest["text"]["vocab_size"] >= 6  # colour, number, 0-3 and the specials
