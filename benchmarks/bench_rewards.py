"""Scoring throughput of mmrl.rewards scorers vs calling the underlying model directly.

Builds small random-weight models (no downloads), saves them, loads them through
``mmrl.rewards.load(name, path=...)`` exactly as a user would, and times, interleaved and repeated:

- ``pickscore``: the scorer vs ``CLIPProcessor`` + ``CLIPModel.get_image/text_features`` +
  ``logit_scale.exp() * cos`` written out by hand;
- ``hps_v2.1``: the scorer vs hpsv2's evaluation transform written with torchvision (``ToTensor``,
  longest edge to 224 on the float tensor, zero padding, mean/std) + ``open_clip``
  ``encode_image/encode_text``.

Both get the same PIL images and prompts and the same batch size and must give the same scores;
the ratio is wrapper images/s ÷ direct images/s, best of ``--repeats`` interleaved runs (goal
≥ 0.95). Usage::

    python benchmarks/bench_rewards.py [--images 64] [--batch-size 16] [--repeats 5]
        [--device cpu|cuda] [--size small|vit-b] [--threads 1]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

SIZES = {  # (vision width, layers, heads, patch, image size) / (text width, layers, heads)
    "small": dict(vision=(256, 4, 4, 32, 224), text=(256, 4, 4), embed=256),
    "vit-b": dict(vision=(768, 12, 12, 32, 224), text=(512, 12, 8), embed=512),
}


def clip_tokenizer_files(d: str):
    """The real CLIP BPE vocabulary (from open_clip's bundled merges) as vocab.json/merges.txt."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    lines = gzip.open(os.path.join(os.path.dirname(open_clip.__file__),
                                   "bpe_simple_vocab_16e6.txt.gz")).read().decode().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    json.dump({t: i for i, t in enumerate(vocab)}, open(os.path.join(d, "vocab.json"), "w"))
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def build_pickscore_dir(d: str, s: dict, crop_to_model: bool = False):
    """A random-weight PickScore directory of size ``s`` (a :data:`SIZES` entry); its processor
    resizes to 224 (CLIP's default) or, with ``crop_to_model``, to the model's input size."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer)
    vw, vl, vh, vp, vs = s["vision"]
    tw, tl, th = s["text"]
    clip_tokenizer_files(d)
    tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                        model_max_length=77)
    ip = (CLIPImageProcessor(size={"shortest_edge": vs}, crop_size={"height": vs, "width": vs})
          if crop_to_model else CLIPImageProcessor())
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=tw, intermediate_size=4 * tw,
                                      num_hidden_layers=tl, num_attention_heads=th,
                                      max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407),
                     vision_config=dict(image_size=vs, patch_size=vp, hidden_size=vw,
                                        intermediate_size=4 * vw, num_hidden_layers=vl,
                                        num_attention_heads=vh),
                     projection_dim=s["embed"])
    CLIPModel(cfg).save_pretrained(d)


def build_hps_ckpt(d: str, size: str):
    import open_clip
    s = SIZES[size]
    vw, vl, vh, vp, vs = s["vision"]
    tw, tl, th = s["text"]
    name = f"mmrl-bench-{size}"
    cfg = {"embed_dim": s["embed"],
           "vision_cfg": {"image_size": vs, "layers": vl, "width": vw, "patch_size": vp,
                          "head_width": vw // vh},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": tw, "heads": th,
                        "layers": tl}}
    json.dump(cfg, open(os.path.join(d, f"{name}.json"), "w"))
    open_clip.add_model_config(os.path.join(d, f"{name}.json"))
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, os.path.join(d, "HPS_v2.1_compressed.pt"))
    return name, os.path.join(d, "HPS_v2.1_compressed.pt")


def direct_pickscore(model, proc, device, bs):
    @torch.no_grad()
    def run(images, prompts):
        out = []
        for i in range(0, len(images), bs):
            inputs = proc(images=images[i:i + bs], text=prompts[i:i + bs], padding=True,
                          truncation=True, max_length=77, return_tensors="pt").to(device)
            img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            txt = model.get_text_features(input_ids=inputs["input_ids"],
                                          attention_mask=inputs["attention_mask"]).pooler_output
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            out.append(model.logit_scale.exp() * (img * txt).sum(-1))
        return torch.cat(out)
    return run


def hpsv2_transform(size: int):
    """hpsv2 1.2.0's ``preprocess_val`` (light_augmentation) for RGB PIL images, by hand."""
    import torchvision.transforms.functional as TF
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def transform(im):
        x = TF.to_tensor(im)
        h, w = x.shape[1:]
        scale = size / float(max(h, w))
        if scale != 1.0:
            h, w = round(h * scale), round(w * scale)
            x = TF.resize(x, [h, w], TF.InterpolationMode.BICUBIC, antialias=True)
        ph, pw = size - h, size - w
        x = TF.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        return TF.normalize(x, mean, std)
    return transform


def direct_hps(model, tokenizer, transform, device, bs):
    @torch.no_grad()
    def run(images, prompts):
        out = []
        for i in range(0, len(images), bs):
            x = torch.stack([transform(im) for im in images[i:i + bs]]).to(device)
            img = model.encode_image(x, normalize=True)
            txt = model.encode_text(tokenizer(prompts[i:i + bs]).to(device), normalize=True)
            out.append((img * txt).sum(-1))
        return torch.cat(out)
    return run


def timed(fn, images, prompts, device):
    """(images/s by wall clock, images/s by this process's CPU time) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    fn(images, prompts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t), len(images) / (time.process_time() - c)


def compare(label, wrapper, direct, images, prompts, device, repeats):
    """Best-of-``repeats`` throughput of each, interleaved (the best run is the least disturbed
    by other processes on a shared machine, as ``timeit`` reports the minimum)."""
    torch.testing.assert_close(wrapper(images, prompts).float().cpu(),
                               direct(images, prompts).float().cpu(), atol=1e-4, rtol=1e-4)
    w, d = [], []
    for _ in range(repeats):
        d.append(timed(direct, images, prompts, device))
        w.append(timed(wrapper, images, prompts, device))
    best_w, best_d = max(x[0] for x in w), max(x[0] for x in d)
    cpu_w, cpu_d = max(x[1] for x in w), max(x[1] for x in d)
    print(f"{label:10s} direct {best_d:8.1f} img/s   mmrl {best_w:8.1f} img/s   ratio "
          f"{best_w / best_d:.3f}   (CPU-time ratio {cpu_w / cpu_d:.3f}; best of {repeats} "
          f"interleaved runs)", flush=True)
    return best_w / best_d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU torch threads (1 is the least "
                    "sensitive to other load on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip
    from transformers import CLIPModel, CLIPProcessor
    import mmrl.rewards as R
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
              for _ in range(args.images)]
    prompts = [f"a photo of object number {i} on a table" for i in range(args.images)]
    print(f"device {device}, {args.images} images 512x512, batch {args.batch_size}, "
          f"model size {args.size}, torch threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        build_pickscore_dir(d, SIZES[args.size])
        wrapper = R.load("pickscore", path=d, device=device, batch_size=args.batch_size)
        model = CLIPModel.from_pretrained(d).to(device).eval()
        direct = direct_pickscore(model, CLIPProcessor.from_pretrained(d), device,
                                  args.batch_size)
        compare("pickscore", wrapper, direct, images, prompts, device, args.repeats)
    with tempfile.TemporaryDirectory() as d:
        arch, ckpt = build_hps_ckpt(d, args.size)
        wrapper = R.load("hps_v2.1", path=ckpt, arch=arch, device=device,
                         batch_size=args.batch_size)
        model = open_clip.create_model(arch, pretrained=None)
        model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
        direct = direct_hps(model.to(device).eval(), open_clip.get_tokenizer(arch),
                            hpsv2_transform(224), device, args.batch_size)
        compare("hps_v2.1", wrapper, direct, images, prompts, device, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
