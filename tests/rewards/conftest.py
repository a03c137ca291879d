"""Tiny reward models built offline from config, saved to disk the way a user's checkpoint is.

- ``tiny_clip_dir``: a transformers ``CLIPModel`` (hidden 32, projection 16, 32x32 images) with a
  ``CLIPProcessor`` whose tokenizer is the real CLIP BPE built from open_clip's
  ``bpe_simple_vocab_16e6.txt.gz``; ``save_pretrained`` to a temp dir (PickScore / CLIP score /
  aesthetic load it through ``mmrl.rewards.load(name, path=dir)``).
- ``tiny_open_clip``: a tiny open_clip architecture registered with ``open_clip.add_model_config``
  and an HPS-style checkpoint ``{"state_dict": ...}`` saved with ``torch.save``.
"""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

TINY_OPEN_CLIP = "mmrl-tiny-vit"


def _write_clip_bpe(dirname: str):
    import open_clip
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    from tokenizers.pre_tokenizers import ByteLevel
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    alphabet = sorted(ByteLevel.alphabet(), key=lambda c: ord(c))
    # open_clip orders the byte alphabet by bytes_to_unicode; rebuild that order exactly.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for c in cs]
    assert sorted(byte_chars) == sorted(alphabet)
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(dirname, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(dirname, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip_bpe"))
    _write_clip_bpe(d)
    return d


def build_tiny_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    return CLIPModel(cfg).eval()


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


def make_images(n: int, size=(40, 48), seed: int = 0, mode: str = "RGB"):
    """n random PIL images (W, H) = size."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        out.append(Image.fromarray(arr).convert(mode))
    return out


@pytest.fixture
def images():
    return make_images(5)
