"""`selfflow prepare`: raw shards -> latent shards read back through the training loader, bad data, the CLI.

The media are decoded here independently (PIL, PyAV, soundfile) and re-encoded with the same
adapters, so the stored tokens, ids and captions are checked against what they should be, and the
tokens are decoded back to the media within bf16 rounding.

    .venv/bin/pytest -q tests/test_prepare.py
"""

import io
import json
import os
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import sentencepiece
import soundfile as sf
import torch
import webdataset as wds
from diffusers import AutoencoderOobleck
from PIL import Image
from tiny_autoencoders import TINY_OOBLECK
from train_runs import torchrun

from selfflow.cli import main
from selfflow.config import load_config
from selfflow.data.loader import LatentStream, LoaderConfig, prepared_modality
from selfflow.data.prepare import PrepareConfig, prepare, tiny_modalities
from selfflow.data.synth import SynthConfig, synth
from selfflow.modalities.audio import OobleckVAE, compute_latent_stats
from selfflow.modalities.builder import ModalityConfig, build_modality
from selfflow.modalities.text import HFTextEncoder, TextConfig

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_images=24, num_videos=6, num_audio=10, samples_per_shard=8)
EXPECTED = {"image": (256, 12, [3, 32, 32]), "video": (144, 192, [3, 9, 32, 32]), "audio": (40, 400, [1, 16000])}
BF16_HALF_ULP = 2**-9  # rounding error of a bf16 value in [-1, 1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    synth(SynthConfig(out_dir=str(root / "raw"), **SMALL))
    cfg = PrepareConfig(raw_dir=str(root / "raw"), out_dir=str(root / "latents"), workers=2, batch_size=4)
    return cfg, prepare(cfg)


def raw_samples(raw: Path, modality: str) -> dict[str, dict]:
    """key -> {"media": decoded here in [-1, 1], "caption", "json", "shard"} from the raw shards."""
    out = {}
    for shard in sorted((raw / modality).glob("*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            if modality == "image":
                pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(s["png"])).convert("RGB")))
                media = pixels.permute(2, 0, 1).float() / 127.5 - 1
            elif modality == "video":
                with av.open(io.BytesIO(s["mp4"])) as container:  # FFmpeg through PyAV, not the project's reader
                    pictures = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
                frames = torch.from_numpy(np.stack(pictures))
                media = frames.permute(3, 0, 1, 2).float() / 127.5 - 1
            else:
                wave, _ = sf.read(io.BytesIO(s["flac"]), dtype="float32", always_2d=True)
                media = torch.from_numpy(wave.T.copy())
            caption, meta = s["txt"].decode(), json.loads(s["json"])
            out[s["__key__"]] = {"media": media, "caption": caption, "json": meta, "shard": shard}
    return out


def latent_shard_members(path: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in wds.WebDataset(str(path), shardshuffle=False)}


# ---------------------------------------------------------------- the tiny raw setup, end to end


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_loader_batches_match_reencoded_media_and_decode_back(prepared, modality):
    cfg, _ = prepared
    out = Path(cfg.out_dir)
    raw = raw_samples(Path(cfg.raw_dir), modality)
    adapter = build_modality(cfg.modalities[modality])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "text" / "spm.model"))
    L, C, shape = EXPECTED[modality]
    stream = LatentStream(LoaderConfig(str(out / modality), shuffle_buffer=16), batch_size=4, seed=0)
    for _ in range(4):
        batch = next(stream)
        assert batch.x0.shape == (4, L, C) and batch.ids.shape == (4, L, 4) and batch.ids.dtype == torch.int64
        media = torch.stack([raw[key]["media"] for key in batch.keys])
        tokens, ids = adapter.tokenize(adapter.encode(media))
        assert torch.equal(batch.ids, ids)
        torch.testing.assert_close(batch.x0, tokens, rtol=0, atol=BF16_HALF_ULP)
        decoded = adapter.decode(adapter.scatter(batch.x0, batch.ids, (4, *shape)))
        torch.testing.assert_close(decoded, media, rtol=0, atol=BF16_HALF_ULP)
        # stored padded to max_length 64, cut after the batch's longest caption
        longest = int(batch.text_mask.sum(dim=1).max())
        assert batch.text.shape == (4, longest) and longest < 64
        assert batch.text.dtype == torch.int64 and batch.text_mask.dtype == torch.bool
        assert batch.labels.tolist() == [-1] * 4
        for key, ids_txt, mask in zip(batch.keys, batch.text, batch.text_mask, strict=True):
            n = int(mask.sum())
            assert 0 < n < 64 and mask[:n].all()  # not truncated; padding (id 0) at the end only
            assert (ids_txt[n:] == 0).all()
            assert sp.decode(ids_txt[:n].tolist()) == " ".join(raw[key]["caption"].split())


def test_shards_counts_manifest_and_config(prepared):
    cfg, summary = prepared
    out, counts = Path(cfg.out_dir), SynthConfig(**SMALL).counts()
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads((out / "summary.json").read_text()) == summary
    for modality, count in counts.items():
        m = summary["modalities"][modality]
        assert (m["written"], m["skipped"], m["damaged_shards"], m["reasons"]) == (count, 0, 0, {})
        L, C, shape = EXPECTED[modality]
        entry = manifest["modalities"][modality]
        assert (entry["count"], entry["tokens"], entry["token_dim"], entry["latent_shape"]) == (count, L, C, shape)
        assert entry["modality"]["patch"] == cfg.modalities[modality].patch
        raw = raw_samples(Path(cfg.raw_dir), modality)
        raw_shards = sorted((Path(cfg.raw_dir) / modality).glob("*.tar"))
        names = [f"{modality}/latent-{i:06d}.tar" for i in range(len(raw_shards))]
        assert [s["path"] for s in entry["shards"]] == names
        for i, shard in enumerate(raw_shards):  # latent shard i holds the samples of raw shard i
            members = latent_shard_members(out / modality / f"latent-{i:06d}.tar")
            assert set(members) == {k for k, r in raw.items() if r["shard"] == shard}
            for key, s in members.items():
                meta = json.loads(s["json"])
                assert s["txt"].decode() == raw[key]["caption"] == meta["caption"]
                assert meta["label"] == -1 and meta["latent_shape"] == shape and meta["modality"] == modality
                assert meta["index"] == raw[key]["json"]["index"]  # the raw attributes are kept
                latent = torch.load(io.BytesIO(s["latent.pth"]), weights_only=True)
                assert latent["tokens"].dtype == torch.bfloat16 and latent["shape"] == shape
    text = manifest["text"]
    assert text["config"]["path"] == str(out / "text" / "spm.model") and 16 < text["vocab_size"] <= 256
    assert load_config(PrepareConfig, out / "config.yaml") == cfg


# ---------------------------------------------------------------- bad data


def png_bytes(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 200, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_samples_and_shards_are_skipped_and_named(tmp_path, capsys):
    synth(SynthConfig(out_dir=str(tmp_path / "raw"), num_images=4, num_videos=0, num_audio=0, samples_per_shard=4))
    folder = tmp_path / "raw" / "image"
    good = folder / "shard-000000.tar"
    caption, meta = b"a red circle on the left, black background", b'{"index": 0}'
    with wds.TarWriter(str(folder / "shard-000001.tar"), encoder=False) as w:
        w.write({"__key__": "bad-png", "png": b"\x89PNG not really", "txt": caption, "json": meta})
        w.write({"__key__": "no-txt", "png": png_bytes(32), "json": meta})
        w.write({"__key__": "no-media", "txt": caption, "json": meta})
        w.write({"__key__": "odd-size", "png": png_bytes(33), "txt": caption})  # 2x2 patches do not tile 33x33
        w.write({"__key__": "bad-json", "png": png_bytes(32), "txt": caption, "json": b"{oops"})
        w.write({"__key__": "ok", "png": png_bytes(32), "txt": caption, "json": meta})
    (folder / "shard-000002.tar").write_bytes(good.read_bytes()[:700])  # cut inside the first sample
    only_image = {"image": tiny_modalities()["image"]}
    cfg = PrepareConfig(raw_dir=str(tmp_path / "raw"), out_dir=str(tmp_path / "out"), modalities=only_image)
    summary = prepare(cfg)["modalities"]["image"]
    reasons = {reason: r["examples"] for reason, r in summary["reasons"].items()}
    assert reasons.pop("damaged shard")[0].startswith("shard-000002.tar")
    assert reasons == {
        "bad json": ["bad-json"],
        "missing caption": ["no-txt"],
        "missing media": ["no-media"],
        "undecodable media": ["bad-png"],
        "unsupported shape": ["odd-size"],
    }
    assert (summary["written"], summary["skipped"], summary["damaged_shards"], summary["shards"]) == (5, 5, 1, 2)
    assert sorted(p.name for p in (tmp_path / "out" / "image").glob("*.tar")) == [
        "latent-000000.tar",
        "latent-000001.tar",
    ]
    # every finished shard is sealed, the one whose raw shard held nothing usable too (and has no file)
    assert len(list((tmp_path / "out" / "image").glob("latent-*.tar.done"))) == 3
    assert set(latent_shard_members(tmp_path / "out" / "image" / "latent-000001.tar")) == {"ok"}
    printed = capsys.readouterr().out
    assert "bad-png" in printed and "shard-000002.tar" in printed and "5 written" in printed


@pytest.mark.parametrize("truncate", [False, True])
def test_captions_longer_than_max_length_are_skipped_or_cut_and_counted(tmp_path, truncate):
    synth(SynthConfig(out_dir=str(tmp_path / "raw"), num_images=6, num_videos=0, num_audio=0, samples_per_shard=6))
    only_image = {"image": tiny_modalities()["image"]}
    cfg = PrepareConfig(raw_dir=str(tmp_path / "raw"), out_dir=str(tmp_path / "out"), modalities=only_image)
    cfg.text.max_length, cfg.text.truncate = 30, truncate  # these captions take 25 to 35 sentencepiece tokens
    summary = prepare(cfg)["modalities"]["image"]
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=cfg.text.path)
    raw = raw_samples(tmp_path / "raw", "image")
    long = sorted(key for key, item in raw.items() if len(sp.encode(item["caption"])) > 30)  # counted independently
    assert 0 < len(long) < 6
    reason = "caption cut to text.max_length" if truncate else "caption longer than text.max_length"
    assert sorted(summary["reasons"][reason]["examples"]) == long
    written = set(latent_shard_members(tmp_path / "out" / "image" / "latent-000000.tar"))
    if truncate:
        assert summary["captions_cut"] == len(long) and summary["skipped"] == 0 and written == set(raw)
    else:
        assert summary["skipped"] == len(long) and written == set(raw) - set(long)


def test_loader_skips_and_counts_a_corrupt_latent_sample(prepared, tmp_path):
    cfg, _ = prepared
    members = latent_shard_members(Path(cfg.out_dir) / "image" / "latent-000000.tar")
    with wds.TarWriter(str(tmp_path / "latent-000000.tar"), encoder=False) as w:
        for key, s in list(members.items())[:4]:
            w.write({"__key__": key, "latent.pth": s["latent.pth"], "text.pth": s["text.pth"], "json": s["json"]})
        w.write({"__key__": "broken", "latent.pth": b"not a torch file", "text.pth": s["text.pth"], "json": s["json"]})
    stream = LatentStream(LoaderConfig(str(tmp_path), shuffle_buffer=4), batch_size=2, seed=0)
    with pytest.warns(UserWarning, match="sample broken cannot be decoded"):
        keys = [key for _ in range(6) for key in next(stream).keys]
    assert "broken" not in keys and set(keys) <= set(members)
    assert stream.skipped.counts["ValueError"] >= 1


# ---------------------------------------------------------------- pretrained paths: Oobleck statistics, T5 text


@pytest.fixture
def t5_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["a", "an", "of", "at", "note", "chord", "melody", "single", "sine", "organ", "plucked", "bpm", "Hz"]
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "t5"
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    T5EncoderModel(cfg).save_pretrained(folder)
    return str(folder)


def test_oobleck_statistics_pass_and_t5_embeddings(tmp_path, t5_dir):
    synth(SynthConfig(out_dir=str(tmp_path / "raw"), num_images=0, num_videos=0, num_audio=6, samples_per_shard=4))
    torch.manual_seed(0)
    AutoencoderOobleck(**TINY_OOBLECK).save_pretrained(tmp_path / "oobleck")
    audio = ModalityConfig("audio", "oobleck", path=str(tmp_path / "oobleck"))
    text = TextConfig(kind="t5", path=t5_dir, max_length=16)
    cfg = PrepareConfig(str(tmp_path / "raw"), str(tmp_path / "out"), {"audio": audio}, text, batch_size=4)
    assert prepare(cfg)["modalities"]["audio"]["written"] == 6
    # the clips as the worker sees them: 16 kHz mono -> 48 kHz stereo, encoded unnormalised here
    raw = raw_samples(tmp_path / "raw", "audio")
    clips = {key: r["media"] for key, r in raw.items()}
    import torchaudio

    stereo = {key: torchaudio.functional.resample(c, 16000, 48000).expand(2, -1) for key, c in clips.items()}
    plain = OobleckVAE(tmp_path / "oobleck")
    expected = compute_latent_stats(plain.encode(c[None]) for c in stereo.values())
    stats_path = tmp_path / "out" / "audio" / "latent_stats.json"
    stats = json.loads(stats_path.read_text())
    torch.testing.assert_close(torch.tensor(stats["mean"]), torch.tensor(expected["mean"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(stats["std"]), torch.tensor(expected["std"]), rtol=1e-4, atol=1e-6)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["modalities"]["audio"]["modality"]["stats"] == str(stats_path)
    assert (manifest["modalities"]["audio"]["tokens"], manifest["text"]["dim"]) == (6000, 32)
    normalised = build_modality(replace(audio, stats=str(stats_path)))
    encoder = HFTextEncoder(text)
    for shard in sorted((tmp_path / "out" / "audio").glob("*.tar")):
        for key, s in latent_shard_members(shard).items():
            latent = torch.load(io.BytesIO(s["latent.pth"]), weights_only=True)
            tokens, ids = normalised.tokenize(normalised.encode(stereo[key][None]))
            assert torch.equal(latent["ids"], ids[0]) and latent["shape"] == [4, 6000]
            torch.testing.assert_close(latent["tokens"].float(), tokens[0], rtol=2**-8, atol=1e-5)
            emb = torch.load(io.BytesIO(s["text.pth"]), weights_only=True)
            want, mask, lengths = encoder.encode([raw[key]["caption"]])
            assert int(lengths[0]) == int(mask[0].sum())  # no caption cut at max_length 16
            assert emb["ids"].dtype == torch.float16 and emb["ids"].shape == (16, 32)
            assert torch.equal(emb["mask"], mask[0])
            torch.testing.assert_close(emb["ids"].float(), want[0], rtol=2**-10, atol=1e-4)


# ---------------------------------------------------------------- CLI


def test_cli_synth_and_prepare(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "latents"
    synth_args = [f"out_dir={raw}", "num_images=8", "num_videos=2", "num_audio=4", "samples_per_shard=4"]
    assert main(["synth", "--config", str(REPO / "configs/data/synth.yaml"), *synth_args]) == 0
    assert "wrote 8 image, 2 video, 4 audio items" in capsys.readouterr().out
    preset = str(REPO / "configs/data/prepare_tiny.yaml")
    assert main(["prepare", "--config", preset, f"raw_dir={raw}", f"out_dir={out}", "modalities.video=null"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["modalities"]) == ["image", "audio"] and not (out / "video").exists()
    assert [manifest["modalities"][m]["count"] for m in ("image", "audio")] == [8, 4]
    assert main(["prepare", f"raw_dir={raw}", f"out_dir={out}", "dtype=fp8"]) == 2
    assert main(["prepare", f"raw_dir={tmp_path / 'nothing'}", f"out_dir={out}"]) == 2
    assert "no raw shards" in capsys.readouterr().err


def test_cli_prepares_audio_as_a_log_spectrogram(tmp_path):
    """`autoencoder=stft` from the command line: the manifest records it, training rebuilds it from there, and
    the stored tokens are the spectrogram of the audio decoded here with soundfile."""
    raw, out = tmp_path / "raw", tmp_path / "latents"
    synth_args = [f"out_dir={raw}", "num_images=0", "num_videos=0", "num_audio=4", "samples_per_shard=4"]
    assert main(["synth", "--config", str(REPO / "configs/data/synth.yaml"), *synth_args]) == 0
    preset = str(REPO / "configs/data/prepare_demo.yaml")
    overrides = ["modalities.image=null", "modalities.video=null", "modalities.audio.autoencoder=stft"]
    overrides += ["modalities.audio.patch=[1]", f"raw_dir={raw}", f"out_dir={out}"]
    assert main(["prepare", "--config", preset, *overrides]) == 0
    entry = json.loads((out / "manifest.json").read_text())["modalities"]["audio"]
    assert (entry["tokens"], entry["token_dim"], entry["modality"]["autoencoder"]) == (125, 256, "stft")
    config = prepared_modality(str(out / "audio"), "audio")
    adapter = build_modality(config)
    assert (config.autoencoder, adapter.hop, adapter.token_dim) == ("stft", 128, 256)
    media = {key: item["media"] for key, item in raw_samples(raw, "audio").items()}
    batch = next(LatentStream(LoaderConfig(str(out / "audio"), shuffle_buffer=1), batch_size=4, seed=0))
    tokens, ids = adapter.tokenize(adapter.encode(torch.stack([media[key] for key in batch.keys])))
    assert torch.equal(batch.ids, ids)
    torch.testing.assert_close(batch.x0, tokens, rtol=0, atol=BF16_HALF_ULP)


def test_cli_help_and_presets(capsys):
    expected = {"synth": ["num_images", "audio_format"], "prepare": ["modalities.audio.patch", "vocab_size"]}
    for job, keys in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            main([job, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "config keys" in text and all(k in text for k in keys)
    # the presets spell out the defaults
    assert load_config(SynthConfig, REPO / "configs/data/synth.yaml") == SynthConfig()
    assert load_config(PrepareConfig, REPO / "configs/data/prepare_tiny.yaml") == PrepareConfig()


def test_config_errors():
    with pytest.raises(ValueError, match="dtype"):
        PrepareConfig(dtype="fp32")
    with pytest.raises(ValueError, match="workers"):
        PrepareConfig(workers=0)
    assert PrepareConfig(out_dir="x").text.path == "x/text/spm.model"


def test_truncated_shard_keeps_the_samples_before_the_damage(tmp_path):
    from selfflow.data.raw import ShardError, read_shard

    with wds.TarWriter(str(tmp_path / "a.tar"), encoder=False) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "png": bytes(1000), "txt": b"hi"})
    data = (tmp_path / "a.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        k2 = tar.getmember("k2.png")
    assert [s["__key__"] for s in read_shard(tmp_path / "a.tar")] == ["k0", "k1", "k2"]
    # cut at k2's header, inside it, inside its data: k1 is only known whole once k2's header is read
    for end, whole in ((k2.offset, ["k0"]), (k2.offset + 300, ["k0"]), (k2.offset_data + 500, ["k0", "k1"])):
        (tmp_path / "b.tar").write_bytes(data[:end])
        seen = []
        with pytest.raises(ShardError, match="b.tar"):
            for sample in read_shard(tmp_path / "b.tar"):
                seen.append(sample["__key__"])
        assert seen == whole, end


# ---------------------------------------------------------------- several processes, resume


def same_outputs(one: Path, other: Path) -> None:
    """The same shards, samples, latents, text ids, sentencepiece model and statistics (paths aside)."""
    manifests = [json.loads((d / "manifest.json").read_text().replace(str(d), "OUT")) for d in (one, other)]
    assert manifests[0] == manifests[1]
    assert (one / "text/spm.model").read_bytes() == (other / "text/spm.model").read_bytes()
    stats = [json.loads((d / "audio/latent_stats.json").read_text()) for d in (one, other)]
    for key in ("mean", "std"):
        torch.testing.assert_close(torch.tensor(stats[1][key]), torch.tensor(stats[0][key]), rtol=1e-9, atol=1e-12)
    names = sorted(p.relative_to(one).as_posix() for p in one.glob("*/latent-*.tar"))
    assert names == sorted(p.relative_to(other).as_posix() for p in other.glob("*/latent-*.tar")) and len(names) == 8
    for name in names:
        a, b = latent_shard_members(one / name), latent_shard_members(other / name)
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key]["json"] == b[key]["json"] and a[key]["txt"] == b[key]["txt"]
            for member in ("latent.pth", "text.pth"):
                x, y = (torch.load(io.BytesIO(s[key][member]), weights_only=True) for s in (a, b))
                for field, value in x.items():  # the same batches through the same code: bit for bit
                    assert torch.equal(y[field], value) if torch.is_tensor(value) else y[field] == value


def test_two_processes_prepare_what_one_does_and_a_killed_run_finishes_on_restart(tmp_path):
    """`selfflow prepare` under torchrun (2 processes, gloo): the union of their shards equals one
    process's output (sentencepiece trained once on every caption, Oobleck statistics merged from both
    processes' moments); a run whose worker is SIGKILLed after sealing a shard stops both processes,
    and the same command then keeps every sealed shard and encodes the rest, to the same set."""
    synth(SynthConfig(out_dir=str(tmp_path / "raw"), num_images=24, num_videos=0, num_audio=8, samples_per_shard=4))
    torch.manual_seed(0)
    AutoencoderOobleck(**TINY_OOBLECK).save_pretrained(tmp_path / "oobleck")
    config = tmp_path / "prepare.yaml"
    image = {"name": "image", "autoencoder": "raw", "patch": [2, 2]}
    audio = {"name": "audio", "autoencoder": "oobleck", "path": str(tmp_path / "oobleck"), "patch": None}
    audio |= {"channels": None, "sample_rate": None}  # the preset's raw-audio values give way to the VAE's
    modalities = {"image": image, "video": None, "audio": audio}
    settings = {"raw_dir": str(tmp_path / "raw"), "modalities": modalities, "workers": 1}
    config.write_text(json.dumps({**settings, "batch_size": 4}))  # YAML reads JSON
    assert main(["prepare", "--config", str(config), f"out_dir={tmp_path / 'one'}"]) == 0

    def two_processes(out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "SELFFLOW_FAULT"} | (
            {"SELFFLOW_FAULT": fault} if fault else {}
        )
        return torchrun(2, "-m", "selfflow.cli", "prepare", "--config", str(config), f"out_dir={out}", env=env)

    proc = two_processes(tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["reused_shards"] == 0
    same_outputs(tmp_path / "one", tmp_path / "two")

    killed = two_processes(tmp_path / "killed", fault="prepare.shard_done@3")  # the worker that sealed shard 3
    assert killed.returncode != 0 and not (tmp_path / "killed" / "manifest.json").exists()
    sealed = {p: p.stat().st_mtime_ns for p in (tmp_path / "killed").glob("*/latent-*.tar.done")}
    assert 1 <= len(sealed) < 8, sealed
    proc = two_processes(tmp_path / "killed")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["reused_shards"] == len(sealed)
    for marker in (tmp_path / "killed").glob("*/latent-*.tar.done"):  # sealed shards were not encoded again
        assert marker not in sealed or marker.stat().st_mtime_ns == sealed[marker]
    same_outputs(tmp_path / "one", tmp_path / "killed")
