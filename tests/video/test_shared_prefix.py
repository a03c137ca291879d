"""The packed layout and mask of the shared-prefix forward (mmrl.video.shared_prefix), worked by
hand; the refusal of attention kernels that take no explicit mask. Values and gradients against
the repeated-prompt forward, per family: tests/video/models/vlm_conformance.py."""
from __future__ import annotations

import pytest
import torch

from mmrl.video.shared_prefix import grouped_layout, grouped_mask


def test_layout_by_hand():
    # rows 0 and 2 belong to prompt 1, row 1 to prompt 0; P = 3 prompt tokens, t = 3 response
    # tokens per row, so each block holds t - 1 = 2 tokens and L = 3 + 2 * 2 = 7
    lay = grouped_layout(torch.tensor([1, 0, 1]), P=3, t=3)
    assert lay.uniq.tolist() == [0, 1] and lay.inv.tolist() == [1, 0, 1]
    assert lay.slot.tolist() == [0, 0, 1] and lay.L == 7
    assert lay.put.tolist() == [[10, 11], [3, 4], [12, 13]]  # flat index u * 7 + position
    # the hidden states that predict tokens 0..2: the prompt's last position (2), then the block
    assert lay.take.tolist() == [[9, 10, 11], [2, 3, 4], [9, 12, 13]]
    assert lay.block.tolist() == [[-1, -1, -1, 0, 0, -2, -2], [-1, -1, -1, 0, 0, 1, 1]]


def test_mask_by_hand():
    lay = grouped_layout(torch.tensor([1, 0, 1]), P=3, t=3)
    attn = torch.tensor([[1, 1, 1], [0, 1, 1]])  # prompt 1 has one left-padding token
    m = grouped_mask(lay, attn)
    assert m.shape == (2, 1, 7, 7) and m.dtype == torch.bool
    one = [[1, 0, 0, 0, 0, 0, 0],   # padding: itself only
           [0, 1, 0, 0, 0, 0, 0],   # prefix: causal over valid prefix keys
           [0, 1, 1, 0, 0, 0, 0],
           [0, 1, 1, 1, 0, 0, 0],   # block 0: the prefix and itself, causal
           [0, 1, 1, 1, 1, 0, 0],
           [0, 1, 1, 0, 0, 1, 0],   # block 1: the prefix and itself, never block 0
           [0, 1, 1, 0, 0, 1, 1]]
    assert m[1, 0].int().tolist() == one
    zero = [[1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 0],   # the unused block 1 of prompt 0 (one row): itself only
            [0, 0, 0, 0, 0, 0, 1]]
    assert m[0, 0].int().tolist() == zero


def test_one_token_responses_read_the_prompt_only():
    lay = grouped_layout(torch.tensor([0, 0]), P=4, t=1)
    assert lay.L == 4 and lay.put.shape == (2, 0) and lay.take.tolist() == [[3], [3]]
    with pytest.raises(ValueError, match="at least one response token"):
        grouped_layout(torch.tensor([0]), P=4, t=0)


def test_attention_without_an_explicit_mask_is_refused(tiny_qwen_dir):
    from mmrl.video.policy import VLMPolicy, load_vlm
    model, proc = load_vlm(tiny_qwen_dir, finetune="full")
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="shared_prefix: false"):
        VLMPolicy(model, proc)
    assert VLMPolicy(model, proc, shared_prefix=False).shared_prefix is False
