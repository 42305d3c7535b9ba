"""Captions are padded to `text.max_length` when prepared and cut after the longest one in a batch:
the cut must change no output of the trunk (padding is masked out of attention)."""

import torch

from selfflow.backbone.mmdit import MMDiTConfig, build_mmdit
from selfflow.data.batch import stack_text


def test_stack_text_cuts_after_the_last_used_column():
    lengths = [3, 5, 2]
    samples = []
    for n in lengths:
        ids = torch.zeros(8, dtype=torch.long)
        ids[:n] = torch.arange(1, n + 1)
        samples.append({"text": {"ids": ids, "mask": ids != 0}})
    text, mask = stack_text(samples)
    assert text.shape == mask.shape == (3, 5)
    assert mask.sum(dim=1).tolist() == lengths and torch.equal(text[1], torch.arange(1, 6))
    assert stack_text([{"text": None}]) == (None, None)


def test_cutting_the_padding_changes_no_output():
    torch.manual_seed(0)
    cfg = MMDiTConfig.tiny()
    cfg.modalities, cfg.text_vocab, cfg.text_max_length = {"image": [16, 16]}, 50, 12
    model = build_mmdit(cfg).eval()
    for p in model.parameters():  # away from the zero-initialised head and modulations
        torch.nn.init.normal_(p, std=0.1)
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0, :4], ids[1, :7] = torch.randint(1, 50, (4,)), torch.randint(1, 50, (7,))
    x, t = torch.randn(2, 16, 16), torch.rand(2, 16)
    pos = torch.zeros(2, 16, 4, dtype=torch.long)
    pos[..., 1], pos[..., 2] = torch.arange(16) // 4, torch.arange(16) % 4
    full = model(x, t, pos, txt=ids, txt_mask=ids != 0, modality="image")
    cut_ids, cut_mask = stack_text([{"text": {"ids": i, "mask": i != 0}} for i in ids])
    assert cut_ids.shape == (2, 7)
    cut = model(x, t, pos, txt=cut_ids, txt_mask=cut_mask, modality="image")
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
