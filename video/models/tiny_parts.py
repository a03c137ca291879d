"""Parts every tiny VLM builder shares (the way diffusion/models/tiny_parts.py serves the flow
families): a byte-level tokenizer built in code and the atomic write of a model folder.
transformers and tokenizers are imported inside the functions."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Sequence


def byte_tokenizer(folder: str, specials: Sequence[str]):
    """A ``Qwen2Tokenizer`` over the 256 ByteLevel characters (no merges), ``<|endoftext|>`` as
    padding, ``<|im_end|>`` as end of turn and ``specials`` as added special tokens; its
    vocab.json and merges.txt are written to ``folder``."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer
    # alphabet() is a set: sort it, or token ids change with PYTHONHASHSEED from run to run
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return Qwen2Tokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                          unk_token=None, bos_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", additional_special_tokens=list(specials))


def save_atomically(folder: str, write: Callable[[str], None], overwrite: bool) -> str:
    """Run ``write(tmp)`` in a private folder beside ``folder``, then rename it into place ->
    ``folder``. Several ranks of one torchrun job may build the same (seeded, identical) model at
    once and none may load a half-written one: a rank that loses the rename drops its copy. An
    existing model (``config.json``) is kept unless ``overwrite``."""
    if not overwrite and os.path.exists(os.path.join(folder, "config.json")):
        return folder
    final = folder.rstrip(os.sep)
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=parent)
    write(tmp)
    if overwrite:
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(tmp, final)  # atomic; replaces an empty folder
    except OSError:  # another process finished first: its model is the same one
        shutil.rmtree(tmp, ignore_errors=True)
    return final
