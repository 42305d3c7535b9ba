"""Text conditioning: `encode(list[str]) -> (embeddings, mask)` from local files only.

- `HFTextEncoder`: a `transformers` model from a local folder. `kind="t5"`: the T5 encoder's last
  hidden state (the default). `kind="causal_lm"`: hidden states of chosen layers of a causal LM
  stacked along channels, as FLUX.2 does with its LM text encoder.
- `SentencePieceTokenizer`: for tiny models, a sentencepiece model trained on the dataset's
  captions (`train_sentencepiece`, run by `selfflow prepare`); its token ids feed the trunk's own
  learned embedder (`MMDiTConfig.text_vocab`).

    encoder = HFTextEncoder(TextConfig(kind="t5", path="/models/t5-v1_1-xxl", max_length=128))
    emb, mask = encoder.encode(["a red circle left of a blue square"])   # (1, 128, 4096), (1, 128)
"""

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

TEXT_KINDS = ("none", "sentencepiece", "t5", "causal_lm")


@dataclass
class TextConfig:
    kind: str = "none"  # none | sentencepiece | t5 | causal_lm
    path: str | None = None  # sentencepiece .model file or a transformers folder
    max_length: int = 64  # tokens; shorter captions are padded (mask False)
    # a longer caption: False (default) skips its sample in `selfflow prepare` (counted and named in
    # summary.json: a caption cut before its key words would train on the wrong text); True cuts it
    # to max_length and counts it
    truncate: bool = False
    layers: list[int] = field(default_factory=lambda: [-1])  # causal_lm: hidden states stacked along channels

    def __post_init__(self):
        if self.kind not in TEXT_KINDS:
            raise ValueError(f"kind must be one of {TEXT_KINDS}, got {self.kind!r}")
        if self.kind != "none" and not self.path:
            raise ValueError(f"text kind {self.kind!r} needs a local path")
        if self.max_length < 1 or not self.layers:
            raise ValueError("max_length must be >= 1 and layers non-empty")


class TextTokens(NamedTuple):
    ids: Tensor  # (B, L) int64
    mask: Tensor  # (B, L) bool, False on padding
    lengths: Tensor  # (B,) each caption's token count before any cut to max_length


class TextEmbeddings(NamedTuple):
    embeddings: Tensor  # (B, L, D)
    mask: Tensor  # (B, L) bool, False on padding
    lengths: Tensor  # (B,) each caption's token count before any cut to max_length


SENTENCEPIECE_TYPES = ("unigram", "bpe", "word")


def train_sentencepiece(
    captions: Iterable[str], path: str | Path, vocab_size: int = 256, model_type: str = "unigram"
) -> Path:
    """Train a sentencepiece model on captions (pad 0, unk 1, eos 2) and write it to `path`.

    `model_type="word"` makes every whitespace-separated word one piece: for a small closed vocabulary
    (the built-in captions use 189 words) a caption is about half as many tokens as with unigram
    pieces, which a few thousand captions cannot grow into whole words.
    """
    if model_type not in SENTENCEPIECE_TYPES:
        raise ValueError(f"model_type must be one of {SENTENCEPIECE_TYPES}, got {model_type!r}")
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(captions)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        eos_id=2,
        bos_id=-1,
        hard_vocab_limit=False,  # tiny caption sets have fewer pieces than asked for
        minloglevel=2,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


class SentencePieceTokenizer:
    def __init__(self, path: str | Path, max_length: int):
        import sentencepiece

        if not Path(path).is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path} (build it with `selfflow prepare`)")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def __call__(self, texts: list[str]) -> TextTokens:
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)  # pad id 0
        encoded = self.sp.encode(list(texts))
        for i, pieces in enumerate(encoded):
            pieces = pieces[: self.max_length]
            ids[i, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
        return TextTokens(ids, ids != 0, torch.tensor([len(p) for p in encoded]))


class HFTextEncoder:
    """A frozen `transformers` text encoder from a local folder (nothing is downloaded)."""

    def __init__(self, cfg: TextConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if cfg.kind not in ("t5", "causal_lm"):
            raise ValueError(f"HFTextEncoder handles kinds t5 and causal_lm, got {cfg.kind!r}")
        folder = Path(cfg.path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {folder} has no config.json")
        from transformers import AutoModelForCausalLM, AutoTokenizer, T5EncoderModel

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        cls = T5EncoderModel if cfg.kind == "t5" else AutoModelForCausalLM
        self.model = cls.from_pretrained(folder, local_files_only=True).to(device=device, dtype=dtype)
        self.model.eval().requires_grad_(False)
        width = self.model.config.d_model if cfg.kind == "t5" else self.model.config.hidden_size
        self.dim = width * (len(cfg.layers) if cfg.kind == "causal_lm" else 1)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbeddings:
        batch = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        ).to(self.model.device)
        mask = batch["attention_mask"].bool()
        lengths = torch.tensor([len(ids) for ids in self.tokenizer(list(texts), truncation=False)["input_ids"]])
        if self.cfg.kind == "t5":
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        else:
            out = self.model(**batch, output_hidden_states=True)
            hidden = torch.cat([out.hidden_states[i] for i in self.cfg.layers], dim=-1)
        return TextEmbeddings(hidden * mask[..., None], mask, lengths)
