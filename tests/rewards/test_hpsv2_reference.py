"""mmrl's HPS scorer and ranked-list protocols against the hpsv2 1.2.0 package's own code
(``.peers/``, see tests/rewards/hpsv2_peer.py), on the same tiny random weights and scores."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mmrl.rewards as R
from mmrl.rewards.evaluate import ranked_report

sys.path.insert(0, os.path.dirname(__file__))
from hpsv2_peer import hpsv2_module, register_arch  # noqa: E402
from reward_testlib import make_images  # noqa: E402

PROMPTS = ["a red cat", "a blue house at night", "two dogs"]
# (W, H): square with and without a resize (the tiny model takes 32 px), landscape, portrait,
# odd padding, and a large upscale-free downsample.
SIZES = [(32, 32), (64, 64), (50, 37), (33, 61), (200, 90), (47, 128)]


@pytest.fixture(scope="module")
def hpsv2(tiny_open_clip, tmp_path_factory):
    """hpsv2's ``img_score`` module primed with the tiny model (its ``model_dict`` cache holds
    the model and its ``preprocess_val``, built by its own ``create_model_and_transforms`` with
    ``light_augmentation=True`` exactly as ``initialize_model`` does), and the checkpoint."""
    import open_clip
    arch, ckpt = tiny_open_clip
    oc = register_arch(arch, open_clip.get_model_config(arch), str(tmp_path_factory.mktemp("c")))
    model, _, preprocess_val = oc.create_model_and_transforms(
        arch, None, precision="fp32", device="cpu", light_augmentation=True, output_dict=True)
    img_score = hpsv2_module("img_score")
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)
    img_score.device = "cpu"
    img_score.root_path = str(tmp_path_factory.mktemp("hps_root"))  # it creates this folder
    return img_score, ckpt


@pytest.fixture(scope="module")
def hps(tiny_open_clip):
    arch, ckpt = tiny_open_clip
    return R.load("hps_v2.1", path=ckpt, arch=arch, device="cpu", batch_size=4)


def _reference(hpsv2, images, prompt):
    img_score, ckpt = hpsv2
    return torch.tensor([float(v) for v in img_score.score(images, prompt, cp=ckpt)])


def _as_tensor(images):
    return torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
                        for im in images])


def test_hps_equals_hpsv2_score_on_pil_and_tensor_inputs(hpsv2, hps):
    worst = 0.0
    for k, size in enumerate(SIZES):
        images, prompt = make_images(3, size=size, seed=20 + k), PROMPTS[k % len(PROMPTS)]
        want = _reference(hpsv2, images, prompt)  # [3]
        pil = hps(images, [prompt] * 3)
        ten = hps(_as_tensor(images), [prompt] * 3)
        worst = max(worst, (pil - want).abs().max().item(), (ten - want).abs().max().item())
        assert want.std() > 1e-3  # the images' scores differ: the check has teeth
    print(f"max |mmrl - hpsv2| over {len(SIZES)} sizes, PIL and tensor: {worst:.2e}")
    assert worst <= 1e-5


def test_hps_grayscale_and_rgba_follow_hpsv2(hpsv2, hps):
    img_score, _ = hpsv2
    pre = img_score.model_dict["preprocess_val"]
    gray = make_images(2, size=(50, 37), seed=3, mode="L")
    torch.testing.assert_close(hps(gray, PROMPTS[:1] * 2), _reference(hpsv2, gray, PROMPTS[0]),
                               atol=1e-5, rtol=0)
    rgba = make_images(2, size=(50, 37), seed=4, mode="RGBA")
    for im in rgba:
        im.putalpha(Image.fromarray(np.arange(50 * 37, dtype=np.uint8).reshape(37, 50)))
    # hpsv2 keeps the alpha as a 4th channel (resized with the colours, not premultiplied) ...
    ref = pre(rgba[0])
    assert ref.shape[0] == 4
    # ... which its 3-channel model rejects; mmrl scores the RGB channels, hpsv2's first three.
    with pytest.raises(RuntimeError):
        _reference(hpsv2, rgba[:1], PROMPTS[0])
    torch.testing.assert_close(hps.preprocess(rgba[:1])[0], ref[:3], atol=1e-6, rtol=0)
    rgb = [im.convert("RGB") for im in rgba]  # PIL drops alpha without premultiplying
    torch.testing.assert_close(hps(rgba, PROMPTS[:1] * 2), _reference(hpsv2, rgb, PROMPTS[0]),
                               atol=1e-5, rtol=0)


def test_hps_pads_what_hpsv2_leaves_non_square(hpsv2, hps):
    """Longest edge already 32 (the model's size): hpsv2 skips the padding and its model fails;
    mmrl pads, scoring it as hpsv2 scores the image padded by hand."""
    im = make_images(1, size=(20, 32), seed=5)[0]
    with pytest.raises(RuntimeError):
        _reference(hpsv2, [im], PROMPTS[0])
    padded = Image.new("RGB", (32, 32))
    padded.paste(im, (6, 0))
    torch.testing.assert_close(hps([im], PROMPTS[:1]), _reference(hpsv2, [padded], PROMPTS[0]),
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- evaluation

def _ranked_lists(seed, n_lists=25, model_ties=True):
    """Ranked records and float32-exact scores: lists of 3-8 images, human ties, model ties."""
    rng = np.random.default_rng(seed)
    records, scores = [], {}
    for i in range(n_lists):
        n = int(rng.integers(3, 9))
        ranks = rng.integers(1, n + 1, size=n)
        if len(set(ranks.tolist())) == 1:
            ranks[0] = ranks[0] % n + 1  # hpsv2 divides by zero on a fully tied list
        s = rng.normal(size=n).astype(np.float32)
        if model_ties and i % 3 == 0:
            s[1] = s[0]
        images = [f"{i}_{k}.png" for k in range(n)]
        records.append({"prompt": f"prompt {i}", "images": images, "ranks": ranks.tolist()})
        scores.update({(f"prompt {i}", im): float(v) for im, v in zip(images, s)})
    return records, scores


class _ScoreModel(torch.nn.Module):
    """Stands in for the CLIP model in hpsv2's evaluation loops: the image "features" are the
    scores themselves (one number per image) and the text features 1, so the logits it builds
    are ``logit_scale · score · 100``, ordered as the scores."""

    def forward(self, images, texts):
        return {"image_features": images, "text_features": torch.ones(len(texts), 1),
                "logit_scale": torch.tensor(1.0)}


def _run_hpsv2(fn, monkeypatch, capsys, tmp_path, meta_name, rows, scores_by_file):
    evaluation = hpsv2_module("evaluation")
    from torch.utils.data import DataLoader

    def serial_loader(*args, **kwargs):  # its 4 worker processes change nothing but speed
        return DataLoader(*args, **{**kwargs, "num_workers": 0})

    monkeypatch.setattr(evaluation, "DataLoader", serial_loader)
    monkeypatch.chdir(tmp_path)  # evaluate_rank writes logs/hps_rank.json
    (tmp_path / meta_name).write_text(json.dumps(rows))
    for name in scores_by_file:
        Image.new("RGB", (2, 2)).save(tmp_path / name)

    def transform(im):  # the image's score as its "pixels"
        return torch.tensor([scores_by_file[os.path.basename(im.filename)]], dtype=torch.float32)

    capsys.readouterr()
    fn(str(tmp_path), str(tmp_path), _ScoreModel(), 4, transform,
       lambda prompt: torch.zeros(1, 1, dtype=torch.long), "cpu")
    return float(capsys.readouterr().out.strip().split(":")[-1])


def test_per_list_mean_equals_hpsv2_imagerewarddb_evaluation(monkeypatch, capsys, tmp_path):
    records, scores = _ranked_lists(seed=0)
    rows = [{"prompt": r["prompt"], "generations": r["images"], "ranking": r["ranks"]}
            for r in records]
    by_file = {im: scores[(r["prompt"], im)] for r in records for im in r["images"]}
    want = _run_hpsv2(hpsv2_module("evaluation").evaluate_IR, monkeypatch, capsys, tmp_path,
                      "ImageReward_test.json", rows, by_file)
    rep = ranked_report(records, scores, n_boot=0, protocol="per_list_mean")
    print(f"hpsv2 evaluate_IR {want:.6f}; mmrl per_list_mean {rep['accuracy']:.6f}, "
          f"pairwise_pooled {rep['accuracy_by_protocol']['pairwise_pooled']:.6f}")
    assert rep["accuracy"] == pytest.approx(want, abs=1e-12)
    # The two protocols differ on these lists (different lengths weigh differently).
    assert abs(rep["accuracy_by_protocol"]["pairwise_pooled"] - want) > 1e-3


def test_inversion_score_equals_hpsv2_hpdv2_evaluation(monkeypatch, capsys, tmp_path):
    records, scores = _ranked_lists(seed=1, model_ties=False)  # hpsv2 breaks model ties by index
    rows = [{"prompt": r["prompt"], "image_path": r["images"], "rank": r["ranks"]}
            for r in records]
    by_file = {im: scores[(r["prompt"], im)] for r in records for im in r["images"]}
    want = _run_hpsv2(hpsv2_module("evaluation").evaluate_rank, monkeypatch, capsys, tmp_path,
                      "test.json", rows, by_file)
    got = ranked_report(records, scores, n_boot=0)["inversion_score"]
    assert got == pytest.approx(want, abs=1e-12)
