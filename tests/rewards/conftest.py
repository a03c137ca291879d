"""Tiny reward models built offline from config, saved to disk the way a user's checkpoint is.

- ``tiny_clip_dir``: a transformers ``CLIPModel`` (hidden 32, projection 16, 32x32 images) with a
  ``CLIPProcessor`` whose tokenizer is the real CLIP BPE built from open_clip's
  ``bpe_simple_vocab_16e6.txt.gz``; ``save_pretrained`` to a temp dir (PickScore / CLIP score /
  aesthetic load it through ``mmrl.rewards.load(name, path=dir)``).
- ``tiny_open_clip``: a tiny open_clip architecture registered with ``open_clip.add_model_config``
  and an HPS-style checkpoint ``{"state_dict": ...}`` saved with ``torch.save``.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from reward_testlib import build_tiny_clip, make_images, write_clip_bpe  # noqa: E402

TINY_OPEN_CLIP = "mmrl-tiny-vit"


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip_bpe"))
    write_clip_bpe(d)
    return d


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, clip_tokenizer_dir):
    """A saved tiny CLIPModel + CLIPProcessor (real CLIP BPE tokenizer)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer
    d = str(tmp_path_factory.mktemp("tiny_clip"))
    tok = CLIPTokenizer(os.path.join(clip_tokenizer_dir, "vocab.json"),
                        os.path.join(clip_tokenizer_dir, "merges.txt"), model_max_length=77)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    build_tiny_clip().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """(arch name, checkpoint file) for a tiny open_clip model in the HPS checkpoint layout."""
    import open_clip
    d = tmp_path_factory.mktemp("tiny_open_clip")
    if TINY_OPEN_CLIP not in open_clip.list_models():
        cfg = {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                            "layers": 2}}
        with open(d / f"{TINY_OPEN_CLIP}.json", "w") as f:
            json.dump(cfg, f)
        open_clip.add_model_config(str(d / f"{TINY_OPEN_CLIP}.json"))
    torch.manual_seed(1)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    # Perturb the weights so scores differ between prompts and images (random init is near-flat).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = d / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return TINY_OPEN_CLIP, str(ckpt)


@pytest.fixture
def images():
    return make_images(5)
