"""Text conditioning: sentencepiece for tiny models, transformers encoders from local folders."""

import pytest
import torch

from selfflow.modalities.text import HFTextEncoder, SentencePieceTokenizer, TextConfig, train_sentencepiece

CAPTIONS = [
    "a red circle left of a blue square",
    "two green triangles at the top",
    "a slow plucked melody of C4 E4 G4 at 80 bpm",
    "a yellow square moving right quickly",
] * 40


def test_sentencepiece_tokenizer_pads_truncates_and_distinguishes(tmp_path):
    path = train_sentencepiece(CAPTIONS, tmp_path / "spm.model", vocab_size=64)
    tok = SentencePieceTokenizer(path, max_length=12)
    out = tok(["a red circle", "two green triangles at the top and a slow plucked melody of C4 E4 G4"])
    assert out.ids.shape == (2, 12) and out.mask.dtype == torch.bool
    assert out.mask[0].sum() < 12 and not out.mask[0, -1]  # short caption padded with id 0
    assert out.mask[1].all()  # long caption truncated to max_length
    assert not torch.equal(out.ids[0], out.ids[1])
    assert tok(["a red circle"]).ids.equal(out.ids[:1])  # deterministic
    assert 3 < tok.vocab_size <= 64
    with pytest.raises(FileNotFoundError, match="sentencepiece model not found"):
        SentencePieceTokenizer(tmp_path / "missing.model", 8)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A word-level fast tokenizer saved as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in CAPTIONS for w in c.split()})
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    ).save_pretrained(folder)
    return folder, len(vocab)


def test_t5_encoder_from_local_folder(tokenizer_dir):
    from transformers import T5Config, T5EncoderModel

    folder, vocab = tokenizer_dir
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).save_pretrained(
        folder
    )
    enc = HFTextEncoder(TextConfig(kind="t5", path=str(folder), max_length=10))
    emb, mask, lengths = enc.encode(["a red circle", "two green triangles at the top"])
    assert emb.shape == (2, 10, 32) and enc.dim == 32
    assert mask.sum(1).tolist() == [3, 6] == lengths.tolist()  # one token per word, no special tokens
    assert enc.encode(["a b c d e f g h i j k l"])[2].tolist() == [12]  # the full length of a caption cut to 10
    assert torch.all(emb[~mask] == 0)  # padding carries no features
    assert (emb[0, :3] - emb[1, :3]).abs().max() > 1e-4


def test_causal_lm_stacks_chosen_layers(tokenizer_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder, vocab = tokenizer_dir
    lm_dir = folder.parent / "lm"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(lm_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            (lm_dir / name).write_bytes((folder / name).read_bytes())
    enc = HFTextEncoder(TextConfig(kind="causal_lm", path=str(lm_dir), max_length=6, layers=[1, 3]))
    emb, mask, _ = enc.encode(["a red circle"])
    assert emb.shape == (1, 6, 32) and enc.dim == 32
    direct = enc.model(
        **enc.tokenizer(["a red circle"], padding="max_length", max_length=6, return_tensors="pt"),
        output_hidden_states=True,
    )
    torch.testing.assert_close(emb[0, :3, 16:], direct.hidden_states[3][0, :3])


def test_text_config_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        TextConfig(kind="clip", path="x")
    with pytest.raises(ValueError, match="needs a local path"):
        TextConfig(kind="t5")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFTextEncoder(TextConfig(kind="t5", path=str(tmp_path)))
