"""Helpers shared by the reward tests (a uniquely named module, so it never collides with
another folder's ``conftest`` in ``sys.modules``)."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import torch
from PIL import Image


def write_clip_bpe(dirname: str):
    """vocab.json + merges.txt of the real CLIP BPE, from open_clip's bundled merges.

    Vocabulary order as open_clip's ``SimpleTokenizer``: the 256 byte characters, the same with
    ``</w>``, the merges joined, then ``<|startoftext|>``, ``<|endoftext|>`` (ids equal).
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(dirname, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(dirname, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


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


def make_images(n: int, size=(40, 48), seed: int = 0, mode: str = "RGB"):
    """n random PIL images (W, H) = size."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        out.append(Image.fromarray(arr).convert(mode))
    return out
