"""Feature extractors for evaluation: TF1 resize and the FID Inception (`selfflow.eval.inception`), and the
DINOv2 / CLIP / CLAP loaders (`selfflow.eval.encoders`), with tiny random `transformers` models saved to disk.

    OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_extractors.py
"""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapTextConfig,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2Model,
)
from transformers.models.clip import CLIPImageProcessorPil

from selfflow.eval.encoders import load_clap, load_clip, load_dinov2, weights_sha256
from selfflow.eval.inception import (
    PT_FID_WEIGHTS_NAME,
    InceptionV3,
    load_inception,
    preprocess,
    tf1_resize_bilinear,
)

# ---------------------------------------------------------------------------------------------
# TF1 bilinear resize
# ---------------------------------------------------------------------------------------------


def tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(H, W, C) float32 -> (out_h, out_w, C): TF1 resize_bilinear_op.cc, legacy scaler, pixel by pixel."""
    in_h, in_w = img.shape[:2]
    scale_y, scale_x = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    out = np.zeros((out_h, out_w, img.shape[2]), np.float32)
    for y in range(out_h):
        in_y = np.float32(y) * scale_y
        y0, y1, ly = max(int(np.floor(in_y)), 0), min(int(np.ceil(in_y)), in_h - 1), in_y - np.floor(in_y)
        for x in range(out_w):
            in_x = np.float32(x) * scale_x
            x0, x1, lx = max(int(np.floor(in_x)), 0), min(int(np.ceil(in_x)), in_w - 1), in_x - np.floor(in_x)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
            out[y, x] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize("in_hw, out_hw", [((5, 7), (11, 4)), ((9, 6), (4, 13)), ((17, 13), (299, 299))])
def test_tf1_resize_matches_numpy_reference(in_hw, out_hw):
    img = np.random.RandomState(0).uniform(0, 255, (*in_hw, 3)).astype(np.float32)
    ours = tf1_resize_bilinear(torch.from_numpy(img).permute(2, 0, 1)[None], out_hw)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, tf1_resize_reference(img, *out_hw))


def test_tf1_resize_hand_computed():
    # 2 -> 4: sources 0, 0.5, 1, 1.5 (the last clamps its upper neighbour to 1), no half-pixel shift.
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30.0]])
    assert torch.equal(tf1_resize_bilinear(x, (4, 4))[0, 0], expected)
    torch_half_pixel = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    assert torch_half_pixel[0, 1] == 2.5  # torch samples 0.25 there: the two conventions really differ


def test_preprocess_scaling_and_input_checks():
    img = np.random.RandomState(1).randint(0, 256, (2, 299, 299, 3)).astype(np.uint8)
    x = preprocess(img)
    expected = (torch.from_numpy(img).permute(0, 3, 1, 2).float() - 128.0) * 0.0078125  # the graph's Sub, Mul
    assert x.shape == (2, 3, 299, 299) and torch.equal(x, expected)  # 299 -> 299 resize is the identity
    assert torch.equal(preprocess(img.astype(np.float32)), x)  # floats are read on the 0..255 scale
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\).*\(2, 3, 299, 299\)"):
        preprocess(torch.zeros(2, 3, 299, 299))


# ---------------------------------------------------------------------------------------------
# Inception-v3
# ---------------------------------------------------------------------------------------------

# Names and shapes read from the pytorch-fid port (torchvision Inception3 + FIDInception* blocks, 1008 classes).
PYTORCH_FID_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch_pool.bn.bias": (32,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.bn.running_mean": (384,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def test_inception_state_dict_has_pytorch_fid_names():
    net = InceptionV3()
    state = net.state_dict()
    for name, shape in PYTORCH_FID_KEYS.items():
        assert tuple(state[name].shape) == shape, name
    # 94 conv+BN units x 6 entries (conv.weight, bn.{weight,bias,running_mean,running_var,num_batches_tracked})
    # + fc.{weight,bias}: the same 566 keys, in the same order, as pytorch-fid's `fid_inception_v3()` model.
    assert len(state) == 94 * 6 + 2
    assert not any("AuxLogits" in k for k in state)
    assert all(m.eps == 0.001 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random weights with non-trivial BN statistics, saved as a plain dict without `num_batches_tracked`
    (the way the TF-graph conversions write the file)."""
    torch.manual_seed(0)
    net = InceptionV3()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.1, 0.1)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(state, path)
    return path, state


def test_load_inception_roundtrip_and_features(inception_file):
    path, state = inception_file
    inception = load_inception(path)
    assert inception.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not inception.matches_reference
    loaded = inception.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not inception.net.training

    captured = {}
    hook = inception.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(out=o))
    images = np.random.RandomState(2).randint(0, 256, (2, 64, 48, 3)).astype(np.uint8)
    feats = inception.embed(images)
    hook.remove()
    assert feats.pool.shape == (2, 2048) and feats.spatial.shape == (2, 2023) and feats.logits.shape == (2, 1008)
    assert feats.pool.dtype == feats.spatial.dtype == feats.logits.dtype == torch.float32
    # sFID: first 7 channels of mixed_6/conv (= Mixed_6d.branch1x1) flattened in TF's NHWC order.
    expected_spatial = captured["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(feats.spatial, expected_spatial)
    assert (feats.spatial >= 0).all()  # a ReLU output
    # IS: ADM multiplies pool_3 by the softmax weight only (no bias).
    torch.testing.assert_close(feats.logits, feats.pool @ state["fc.weight"].T)
    assert not torch.allclose(feats.logits, feats.pool @ state["fc.weight"].T + state["fc.bias"])


def test_load_inception_errors(inception_file, tmp_path):
    path, state = inception_file
    with pytest.raises(FileNotFoundError, match=PT_FID_WEIGHTS_NAME):
        load_inception(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="expected 0+"):
        load_inception(path, expected_sha256="0" * 64)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if k != "fc.bias"}, partial)
    with pytest.raises(ValueError, match=r"(?s)partial\.pth.*fc\.bias"):
        load_inception(partial)


# ---------------------------------------------------------------------------------------------
# DINOv2, CLIP, CLAP from tiny random models
# ---------------------------------------------------------------------------------------------

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)


def test_dinov2_cls_embedding(tmp_path):
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(image_size=224, patch_size=14, **TINY)).eval()
    model.save_pretrained(tmp_path)
    dino = load_dinov2(tmp_path)
    assert dino.sha256 == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert dino.weight_sha256 == {"model.safetensors": dino.sha256}

    images = np.random.RandomState(3).randint(0, 256, (2, 40, 50, 3)).astype(np.uint8)
    emb = dino.embed(images)
    # dgm-eval preprocessing written out: PIL bicubic to 224x224, /255, ImageNet mean/std; CLS after final norm.
    resized = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.Resampling.BICUBIC)) for im in images])
    pixels = (resized.astype(np.float32) / 255 - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state[:, 0]
    assert emb.shape == (2, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        dino.embed(images.astype(np.float32))


def _tiny_clip_tokenizer(folder) -> tuple[CLIPTokenizer, dict[str, int]]:
    """A byte-level BPE with letters, letter</w>, two merges ("c a" -> "ca", "ca t</w>" -> "cat</w>") and CLIP's
    start/end tokens, written as vocab.json + merges.txt."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*letters, *(c + "</w>" for c in letters), "ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=16)
    return tokenizer, vocab


def _save_tiny_clip(root):
    src, out = root / "src", root / "clip"
    src.mkdir()
    tokenizer, vocab = _tiny_clip_tokenizer(src)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    text = CLIPTextConfig(
        vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **TINY
    )
    vision = CLIPVisionConfig(image_size=32, patch_size=8, **TINY)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return model, vocab, out


def test_clip_image_and_text_embeddings(tmp_path):
    model, vocab, folder = _save_tiny_clip(tmp_path)
    clip = load_clip(folder)
    assert clip.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    images = np.random.RandomState(4).randint(0, 256, (2, 40, 50, 3)).astype(np.uint8)
    # CLIP preprocessing written out: shortest edge 40 -> 32 (PIL bicubic, 40x50 -> 32x40), centre crop 32, CLIP stats.
    mean, std = np.float32([0.48145466, 0.4578275, 0.40821073]), np.float32([0.26862954, 0.26130258, 0.27577711])
    crops = [np.asarray(Image.fromarray(im).resize((40, 32), Image.Resampling.BICUBIC))[:, 4:36] for im in images]
    pixels = torch.from_numpy((np.stack(crops).astype(np.float32) / 255 - mean) / std).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected_img = model.get_image_features(pixel_values=pixels).pooler_output
    emb = clip.embed(images)
    assert emb.shape == (2, 24) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, expected_img, rtol=1e-4, atol=1e-4)

    # "a cat" -> <start> a</w> cat</w> <end>; "the dog" -> letters; padded with <end>, mask 0 there.
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids_a = [bos, vocab["a</w>"], vocab["cat</w>"], eos]
    ids_b = [bos, vocab["t"], vocab["h"], vocab["e</w>"], vocab["d"], vocab["o"], vocab["g</w>"], eos]
    input_ids = torch.tensor([ids_a + [eos] * 4, ids_b])
    mask = torch.tensor([[1] * 4 + [0] * 4, [1] * 8])
    with torch.no_grad():
        expected_txt = model.get_text_features(input_ids=input_ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(clip.embed_text(["a cat", "the dog"]), expected_txt, rtol=1e-5, atol=1e-5)
    assert clip.embed_text(["a cat " * 20]).shape == (1, 24)  # truncated to the 16 positions, not an error


def test_clip_missing_tokenizer_is_named(tmp_path):
    _, _, folder = _save_tiny_clip(tmp_path)
    (folder / "tokenizer.json").unlink()  # save_pretrained writes tokenizer.json (transformers 5)
    (folder / "merges.txt").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=rf"{folder}.*tokenizer\.json"):
        load_clip(folder)


def _save_tiny_clap(folder):
    audio = ClapAudioConfig(
        num_mel_bins=16,
        spec_size=64,
        freq_ratio=2,
        window_size=4,
        patch_size=2,
        patch_stride=2,
        hidden_size=32,
        patch_embeds_hidden_size=16,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        intermediate_size=37,
    )
    text = ClapTextConfig(vocab_size=99, max_position_embeddings=40, **{**TINY, "num_hidden_layers": 1})
    torch.manual_seed(0)
    model = ClapModel(ClapConfig(audio_config=audio.to_dict(), text_config=text.to_dict(), projection_dim=24)).eval()
    model.save_pretrained(folder)
    # 1 s at 48 kHz -> 101 mel frames, within the tiny HTSAT's 64 * 2 time positions.
    extractor = ClapFeatureExtractor(feature_size=16, sampling_rate=48000, max_length_s=1, truncation="rand_trunc")
    extractor.save_pretrained(folder)
    return model, extractor


def test_clap_audio_embeddings(tmp_path):
    import torchaudio

    model, extractor = _save_tiny_clap(tmp_path)
    clap = load_clap(tmp_path)
    assert clap.sha256 == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    rng = np.random.RandomState(5)
    clips = [rng.randn(30000).astype(np.float32) * 0.1, rng.randn(40000).astype(np.float32) * 0.1]

    emb = clap.embed(clips, sample_rate=48000)
    with torch.no_grad():
        expected = model.get_audio_features(**extractor(clips, sampling_rate=48000, return_tensors="pt"))
    assert emb.shape == (2, 24) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, expected.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))

    low = torch.from_numpy(rng.randn(2, 16000).astype(np.float32) * 0.1)  # 16 kHz input is resampled to 48 kHz
    torch.testing.assert_close(
        clap.embed(low, 16000), clap.embed(torchaudio.functional.resample(low, 16000, 48000), 48000)
    )

    long_clip = [rng.randn(48000 * 3).astype(np.float32)]  # longer than max_length_s: a random crop, seeded
    state = np.random.get_state()
    assert torch.equal(clap.embed(long_clip, 48000), clap.embed(long_clip, 48000))
    assert not torch.equal(clap.embed(long_clip, 48000, seed=0), clap.embed(long_clip, 48000, seed=1))
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # the global numpy generator is untouched
    with pytest.raises(ValueError, match="clip 0 has shape"):
        clap.embed([np.zeros((2, 100), np.float32)], 48000)


@pytest.mark.parametrize("loader", [load_dinov2, load_clip, load_clap])
def test_missing_directory_and_weights_are_named(loader, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        loader(tmp_path / "no_such_model")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "preprocessor_config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*model\.safetensors"):
        loader(tmp_path)


def test_sharded_weights_digest(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"first shard")
    (tmp_path / "b.safetensors").write_bytes(b"second shard")
    index = {"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    combined, per_file = weights_sha256(tmp_path)
    digests = {n: hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.safetensors", "b.safetensors")}
    assert per_file == digests
    lines = f"a.safetensors {digests['a.safetensors']}\nb.safetensors {digests['b.safetensors']}\n"
    assert combined == hashlib.sha256(lines.encode()).hexdigest()
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.safetensors.*model\.safetensors\.index\.json"):
        weights_sha256(tmp_path)
