"""What the flow benchmarks share: the tiny SD3 pipeline of the colour task.

The tiny SD3 of :func:`mmrl.diffusion.models.sd3.build_tiny_sd3` has a one-block random VAE
whose decoder ends in GroupNorm -> SiLU -> conv: its images' mean colour barely depends on the
latents (std 0.01 per channel over random latents; even latents optimized by gradient ascent
reach only about -0.37 on ``prompt_color``, from -0.47). The benchmarks multiply the decoder's
last conv weights by ``gain`` (default 4), which leaves the architecture and the transformer
alone and makes the colour task learnable: the same gradient ascent then reaches -0.02
(green) to -0.27 (red). ``t5=True`` adds a tiny T5 text encoder (flow_grpo's loop requires
``text_encoder_3``); the CLIP byte tokenizer serves as its tokenizer.
"""
from __future__ import annotations

from pathlib import Path


def build_color_sd3(out_dir, size: int = 8, gain: float = 4.0, t5: bool = False,
                    seed: int = 0) -> str:
    """Save the benchmark's tiny SD3 pipeline to ``out_dir`` (kept when it is already there);
    returns the folder (``model_index.json`` inside)."""
    import torch

    from mmrl.diffusion.models.sd3 import build_tiny_sd3

    out = Path(out_dir)
    if (out / "model_index.json").exists():
        return str(out)
    pipe = build_tiny_sd3(size, seed)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.mul_(gain)
    if t5:
        from transformers import T5Config, T5EncoderModel
        torch.manual_seed(seed + 1)
        vocab = pipe.tokenizer.vocab_size
        dim = pipe.transformer.config.joint_attention_dim
        encoder = T5EncoderModel(T5Config(vocab_size=vocab, d_model=dim, d_ff=dim, d_kv=dim // 4,
                                          num_layers=1, num_heads=4, pad_token_id=vocab - 1))
        pipe.register_modules(text_encoder_3=encoder, tokenizer_3=pipe.tokenizer)
    pipe.save_pretrained(out)
    return str(out)


def write_docs_block(path, name: str, lines) -> None:
    """Replace the lines between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``
    (the measured tables in docs/diffusion_train.md), so a re-run updates the docs in place.

    Raises:
        ValueError: the markers are missing.
    """
    path = Path(path)
    text = path.read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{path}: no {begin} ... {end} block; add the two marker lines where "
                         f"the measured table belongs")
    head, rest = text.split(begin, 1)
    path.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
