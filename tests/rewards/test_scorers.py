"""Scorers loaded from tiny saved checkpoints through ``mmrl.rewards.load``, against independent
computations; plus a conformance suite over every registered scorer."""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch
# the hand-built pipelines use open_clip's constants, not the library's (a typo there must show)
from open_clip.constants import OPENAI_DATASET_MEAN as OPENAI_MEAN
from open_clip.constants import OPENAI_DATASET_STD as OPENAI_STD
from PIL import Image

import mmrl.rewards as R
from mmrl.train.reward_fn import evaluate_reward
from mmrl.rewards.base import WeightsNotFoundError

sys.path.insert(0, os.path.dirname(__file__))
from reward_testlib import make_images  # noqa: E402

PROMPTS = ["a red cat", "a blue house at night", "two dogs", "an apple", "a photo of a boat"]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory):
    from mmrl.rewards.clip_hf import AestheticMLP
    torch.manual_seed(3)
    mlp = AestheticMLP(16)
    path = tmp_path_factory.mktemp("aes") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), path)
    return str(path), mlp.eval()


@pytest.fixture(scope="module")
def fake_imagereward(tiny_clip_dir):
    """A stand-in for the optional ``ImageReward`` package with its interface (BLIP parts, MLP,
    mean/std), so the batched scoring path can be checked against the package's per-sample
    formula without the package."""
    from torchvision import transforms as T
    from transformers import CLIPTokenizer
    torch.manual_seed(5)

    class TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(49408, 8)

        def forward(self, ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                    return_dict):
            h = self.emb(ids) * attention_mask[..., None] + encoder_hidden_states.mean(1, True)
            return types.SimpleNamespace(last_hidden_state=h)

    class FakeRM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blip = torch.nn.Module()
            self.blip.tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
            self.blip.visual_encoder = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 56, 56), torch.nn.Flatten(2), _Transpose())
            self.blip.text_encoder = TextEncoder()
            self.mlp = torch.nn.Linear(8, 1)
            self.mean, self.std = 0.16717362830052426, 1.0333394966054072
            # The package's transform (ImageReward/ImageReward.py `_transform(224)`).
            self.preprocess = T.Compose([
                T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])

        def score_one(self, prompt, image):  # the package's per-prompt formula
            t = self.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35,
                                    return_tensors="pt")
            e = self.blip.visual_encoder(self.preprocess(image)[None])
            out = self.blip.text_encoder(t.input_ids, t.attention_mask, e,
                                         torch.ones(e.shape[:-1], dtype=torch.long), True)
            return (self.mlp(out.last_hidden_state[:, 0]).item() - self.mean) / self.std

    model = FakeRM().eval()
    module = types.ModuleType("ImageReward")
    module.load = lambda src, device="cpu", download_root=None, med_config=None: model
    return module, model


class _Transpose(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


@pytest.fixture(scope="module")
def scorers(tiny_clip_dir, tiny_open_clip, aesthetic_head, fake_imagereward):
    arch, ckpt = tiny_open_clip
    sys.modules["ImageReward"] = fake_imagereward[0]
    try:
        out = {
            "pickscore": R.load("pickscore", path=tiny_clip_dir, batch_size=2),
            "clip_score": R.load("clip_score", path=tiny_clip_dir, variant="cos_x100",
                                 batch_size=2),
            "aesthetic": R.load("aesthetic", path=aesthetic_head[0], clip_path=tiny_clip_dir,
                                batch_size=2),
            "hps_v2": R.load("hps_v2", path=ckpt, arch=arch, batch_size=2),
            "hps_v2.1": R.load("hps_v2.1", path=os.path.dirname(ckpt), arch=arch, batch_size=2),
            "imagereward": R.load("imagereward", batch_size=2),
            "jpeg_compressibility": R.load("jpeg_compressibility", batch_size=2),
            "brightness": R.load("brightness", batch_size=2),
            "color": R.load("color", target=[1, 0, 0], batch_size=2),
            "prompt_color": R.load("prompt_color", missing=-1.0, batch_size=2),
        }
    finally:
        del sys.modules["ImageReward"]
    return out


@pytest.fixture(scope="module")
def ref_clip(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor
    return (CLIPModel.from_pretrained(tiny_clip_dir).eval(),
            CLIPProcessor.from_pretrained(tiny_clip_dir))


def _reference_clip(ref_clip, images, prompts):
    """(cos, logit_scale.exp()) through CLIPModel.forward, independent of the scorer's path."""
    model, proc = ref_clip
    inputs = proc(images=images, text=prompts, padding=True, truncation=True, max_length=77,
                  return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    cos = (out.image_embeds * out.text_embeds).sum(-1)  # both L2-normalized by CLIPModel
    return cos, model.logit_scale.exp()


# --------------------------------------------------------------------------- reference values

def test_tiny_clip_tokenizer_is_the_real_clip_bpe(ref_clip):
    """The test tokenizer (built offline from open_clip's merges) gives open_clip's ids."""
    import open_clip
    texts = ["a photo of a cat, sitting!", "Hello Wörld 123 ☃ 🙂", "two dogs"]
    ids = ref_clip[1].tokenizer(texts)["input_ids"]
    ref = open_clip.get_tokenizer("ViT-H-14")(texts).tolist()
    assert all(a == r[:len(a)] and r[len(a)] == 0 for a, r in zip(ids, ref))


def test_pickscore_equals_logit_scale_exp_times_cosine(scorers, ref_clip):
    images = make_images(5)
    cos, scale = _reference_clip(ref_clip, images, PROMPTS)
    got = scorers["pickscore"](images, PROMPTS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, scale * cos, atol=1e-5, rtol=1e-5)
    assert got.std() > 1e-4  # prompts/images actually change the score


def test_pickscore_probabilities_over_a_prompts_candidates(scorers, ref_clip):
    """PickScore's README: ``probs = softmax(logit_scale.exp() * text_emb @ image_embs.T)`` over
    the images of one prompt; here CLIPModel's ``logits_per_text`` for two prompts' groups."""
    model, proc = ref_clip
    images = make_images(5, seed=6)
    prompts = ["a red cat"] * 3 + ["two dogs"] * 2
    want = []
    for text, ims in (("a red cat", images[:3]), ("two dogs", images[3:])):
        inputs = proc(images=ims, text=[text], padding=True, return_tensors="pt")
        with torch.no_grad():
            want.append(model(**inputs).logits_per_text[0].softmax(-1))  # [1, n] -> [n]
    got = R.candidate_probs(scorers["pickscore"](images, prompts), prompts)
    torch.testing.assert_close(got, torch.cat(want), atol=1e-6, rtol=1e-5)
    assert got[:3].sum().item() == pytest.approx(1.0) and got.std() > 1e-4


@pytest.mark.parametrize("normalize,fn", [
    ("div26", lambda s, c: s / 26), ("shift18_div8", lambda s, c: (s - 18) / 8),
    ("cosine", lambda s, c: c)])
def test_pickscore_normalizations(tiny_clip_dir, ref_clip, normalize, fn):
    images = make_images(3)
    cos, scale = _reference_clip(ref_clip, images, PROMPTS[:3])
    got = R.load("pickscore", path=tiny_clip_dir, normalize=normalize)(images, PROMPTS[:3])
    torch.testing.assert_close(got, fn(scale * cos, cos), atol=1e-5, rtol=1e-5)


def test_clip_score_variants(tiny_clip_dir, ref_clip, scorers):
    images = make_images(5, seed=4)
    cos, _ = _reference_clip(ref_clip, images, PROMPTS)
    torch.testing.assert_close(scorers["clip_score"](images, PROMPTS), 100 * cos, atol=1e-4,
                               rtol=1e-5)
    hessel = R.load("clip_score", path=tiny_clip_dir, variant="hessel")(images, PROMPTS)
    torch.testing.assert_close(hessel, 2.5 * cos.clamp_min(0), atol=1e-6, rtol=1e-5)
    # the tiny CLIP's cosines are all positive: stub the embeddings to reach max(cos, 0)
    stubbed = R.load("clip_score", path=tiny_clip_dir, variant="hessel")
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    stubbed.clip = types.SimpleNamespace(image_embeds=lambda images: e,
                                         text_embeds=lambda prompts: torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(stubbed(images[:2], PROMPTS[:2]), torch.tensor([0.0, 2.0]))
    stubbed.clip.text_embeds = lambda prompts: torch.tensor([[-0.6, 0.8]])  # cos -0.6 and 0.28
    torch.testing.assert_close(stubbed(images[:2], PROMPTS[:2]), torch.tensor([0.0, 0.7]))
    with pytest.raises(ValueError, match="variant=None; choose one explicitly.*hessel"):
        R.load("clip_score", path=tiny_clip_dir)


def test_aesthetic_is_mlp_of_normalized_image_embedding(scorers, ref_clip, aesthetic_head):
    images = make_images(4, seed=2)
    model, proc = ref_clip
    pv = proc(images=images, return_tensors="pt")
    with torch.no_grad():
        e = model(pixel_values=pv["pixel_values"], input_ids=torch.tensor([[49406, 49407]])
                  ).image_embeds
        want = aesthetic_head[1](e).squeeze(-1)
    torch.testing.assert_close(scorers["aesthetic"](images, None), want, atol=1e-5, rtol=1e-5)


def _hand_hps_pixels(im: Image.Image, size: int) -> torch.Tensor:
    """hpsv2's transform by hand with torchvision: RGB, ToTensor, the longest edge to ``size`` on
    the float tensor (bicubic), zero padding to the square (odd pixel right / bottom), mean/std."""
    import torchvision.transforms.functional as TF
    x = TF.to_tensor(im.convert("RGB"))
    h, w = x.shape[1:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    if (h, w) != (nh, nw):
        x = TF.resize(x, [nh, nw], TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.pad(x, [(size - nw) // 2, (size - nh) // 2, size - nw - (size - nw) // 2,
                   size - nh - (size - nh) // 2], fill=0)
    return TF.normalize(x, OPENAI_MEAN, OPENAI_STD)


def test_hps_preprocessing_matches_hand_built_pipeline(scorers):
    hps = scorers["hps_v2.1"]
    images = make_images(2, size=(50, 37)) + make_images(1, size=(33, 61), mode="RGBA") \
        + make_images(1, size=(45, 45), mode="L") + make_images(1, size=(32, 20))
    got = hps.preprocess(images)
    want = torch.stack([_hand_hps_pixels(im, 32) for im in images])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # Longest edge 50 -> 32, 37 -> round(23.68) = 24: 4 black rows above, 4 below.
    black = (torch.zeros(3) - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(got[0, :, :4], black[:, None, None].expand(3, 4, 32))
    torch.testing.assert_close(got[0, :, 28:], black[:, None, None].expand(3, 4, 32))
    assert (got[0, :, 4:28] - black[:, None, None]).abs().amin(dim=0).gt(0).float().mean() > 0.9
    # Already 32 on the longest edge: no resize, only padding (hpsv2 would skip the padding).
    torch.testing.assert_close(got[4, :, 6:26], _hand_hps_pixels(images[4], 32)[:, 6:26])


def test_hps_tensor_path_equals_pil_path_and_has_gradients(scorers):
    hps = scorers["hps_v2.1"]
    images = make_images(3, size=(50, 37), seed=4)
    x = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
                     for im in images])
    torch.testing.assert_close(hps.preprocess(x), hps.preprocess(images), atol=1e-6, rtol=0)
    x.requires_grad_(True)
    hps.preprocess(x).sum().backward()
    assert x.grad.abs().min() > 0  # every pixel reaches the model input


def test_hps_score_is_open_clip_cosine(scorers, tiny_open_clip):
    import open_clip
    arch, ckpt = tiny_open_clip
    model = open_clip.create_model(arch, pretrained=None).eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    images = make_images(5, size=(40, 36), seed=7)
    x = torch.stack([_hand_hps_pixels(im, 32) for im in images])
    with torch.no_grad():
        img_f, txt_f, _ = model(x, open_clip.get_tokenizer(arch)(PROMPTS))
    want = (img_f * txt_f).sum(-1)
    for name in ("hps_v2", "hps_v2.1"):
        torch.testing.assert_close(scorers[name](images, PROMPTS), want, atol=1e-5, rtol=1e-5)


def test_imagereward_batched_equals_package_formula(scorers, fake_imagereward):
    images = make_images(5, size=(64, 60), seed=9)
    want = torch.tensor([fake_imagereward[1].score_one(p, im) for p, im in zip(PROMPTS, images)])
    torch.testing.assert_close(scorers["imagereward"](images, PROMPTS), want, atol=1e-5,
                               rtol=1e-5)


def test_imagereward_local_files_are_passed_to_the_package(monkeypatch, tmp_path,
                                                           fake_imagereward):
    seen = []
    module = types.ModuleType("ImageReward")
    module.load = lambda src, **kw: seen.append((src, kw)) or fake_imagereward[1]
    monkeypatch.setitem(sys.modules, "ImageReward", module)
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    (tmp_path / "med_config.json").write_text("{}")
    R.load("imagereward", path=str(tmp_path), device="cpu")
    R.load("imagereward", path=str(tmp_path / "ImageReward.pt"), device="cpu")
    cfg = str(tmp_path / "med_config.json")
    assert seen == [("ImageReward-v1.0", dict(device="cpu", download_root=str(tmp_path),
                                              med_config=cfg)),
                    (str(tmp_path / "ImageReward.pt"), dict(device="cpu",
                                                            download_root=str(tmp_path),
                                                            med_config=cfg))]


def test_imagereward_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    with pytest.raises(ImportError, match="pip install image-reward.*mmrl reward serve"):
        R.load("imagereward")


class _FakePackage:
    """A meta-path finder serving an ``ImageReward`` package whose import runs ``code`` (the
    import line of the real package that fails)."""

    def __init__(self, code):
        self.code = code

    def find_spec(self, name, path=None, target=None):
        import importlib.util
        return importlib.util.spec_from_loader(name, self) if name == "ImageReward" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(self.code, module.__dict__)


@pytest.mark.parametrize("code,match", [
    # ImageReward/models/CLIPScore.py: OpenAI CLIP, not among the package's requirements.
    ("import clip", r"(?s)imports OpenAI's CLIP as `clip`, which it does not declare.*"
                    r"pip install openai-clip.*mmrl reward serve imagereward"),
    # ImageReward/models/BLIP/med.py, under the pinned transformers 5.
    ("from transformers.modeling_utils import PreTrainedModel, apply_chunking_to_forward",
     r"(?s)does not work with transformers 5\..*apply_chunking_to_forward.*transformers 5 "
     r"removed.*own environment.*transformers<5.*mmrl reward serve imagereward.*'remote'"),
    ("import fairscale_missing_for_the_test",
     r"needs the module 'fairscale_missing_for_the_test'.*mmrl reward serve"),
])
def test_imagereward_import_failures_say_why(monkeypatch, code, match):
    monkeypatch.delitem(sys.modules, "ImageReward", raising=False)
    monkeypatch.setitem(sys.modules, "clip", None)  # absent, whatever this machine has
    monkeypatch.setattr(sys, "meta_path", [_FakePackage(code)] + sys.meta_path)
    with pytest.raises(ImportError, match=match):
        R.load("imagereward")


def test_rule_rewards_hand_values():
    white = torch.ones(1, 3, 8, 8)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    half = torch.full((1, 3, 8, 8), 0.5)
    x = torch.cat([white, red, half])
    torch.testing.assert_close(R.load("brightness")(x, None), torch.tensor([1.0, 0.299, 0.5]))
    torch.testing.assert_close(R.load("brightness", target=0.5)(x, None),
                               torch.tensor([-0.5, -0.201, 0.0]))
    color = R.load("color", target=[1, 0, 0])(x, None)
    torch.testing.assert_close(color, torch.tensor([-np.sqrt(2 / 3), 0.0, -np.sqrt(0.75 / 3)],
                                                   dtype=torch.float32))
    import io
    im = make_images(1, size=(64, 64))[0]
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    got = R.load("jpeg_compressibility")([im], None)
    assert got.item() == pytest.approx(-buf.tell() / 1000 / 500)
    flat = Image.new("RGB", (64, 64), (120, 120, 120))
    assert R.load("jpeg_compressibility")([flat], None) > got  # flat compresses better
    # tensors are rounded to uint8, not truncated: gray 128 + 0.4 or + 0.6 at random is the
    # 128/129 noise image (about 1.7 KB); truncated it would be flat 128 (about 1.4 KB)
    up = np.random.default_rng(0).random((64, 64, 3)) < 0.5
    x = torch.from_numpy((128 + np.where(up, 0.6, 0.4)).astype(np.float32) / 255)
    jpeg = R.load("jpeg_compressibility")
    want = jpeg([Image.fromarray((128 + up).astype(np.uint8))], None)
    assert jpeg(x.permute(2, 0, 1)[None], None).item() == want.item()
    assert want.item() < jpeg([Image.new("RGB", (64, 64), (128, 128, 128))], None).item()


def test_prompt_color_hand_values():
    from mmrl.rewards.rules import prompt_color
    assert [prompt_color(p) for p in ("a blue car by a Red wall", "A RED apple", "a reddish fox",
                                      "a grey cat", "two dogs")] == \
        ["blue", "red", None, "grey", None]
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    half = torch.full((1, 3, 4, 4), 0.5)
    x = torch.cat([red, red, half, red])
    s = R.load("prompt_color")
    # red vs red: 0; red vs blue (0,0,1): sqrt(2); gray .5 vs white: sqrt(3 * .25); red vs
    # orange (1, .647, 0): .647; all divided by sqrt(3)
    got = s(x, ["a red apple", "a blue car", "a white cat", "an orange ball"])
    want = torch.tensor([0.0, -np.sqrt(2 / 3), -0.5, -0.647 / np.sqrt(3)], dtype=torch.float32)
    torch.testing.assert_close(got, want)
    left = red.clone()
    left[..., :2] = 0  # left half black: mean (0.5, 0, 0)
    torch.testing.assert_close(s(left, ["a black cat"]), torch.tensor([-0.5 / 3 ** 0.5]))
    # the same image scores by the prompt: a policy must read it
    assert s(red, ["a red apple"]) > s(red, ["a green apple"])
    with pytest.raises(ValueError, match=r"1 prompt\(s\) name no colour, e.g. 'two dogs'.*"
                                         r"missing=-1.0"):
        s(x[:2], ["a red apple", "two dogs"])
    torch.testing.assert_close(R.load("prompt_color", missing=-1.0)(x[:2], ["a red apple",
                                                                           "two dogs"]),
                               torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match=r"missing=0.5; expected a number in \[-1, 0\]"):
        R.load("prompt_color", missing=0.5)
    g = R.load("prompt_color", grad=True)
    y = half.clone().requires_grad_(True)
    g(y, ["a red apple"]).sum().backward()
    # d/dx -||m - t||/sqrt3 with m - t = (-.5, .5, .5): -(m - t)/(|m - t| sqrt3) / 16 pixels
    want = torch.tensor([0.5, -0.5, -0.5]) / (np.sqrt(0.75) * np.sqrt(3) * 16)
    torch.testing.assert_close(y.grad[0, :, 0, 0], want.float())


def test_gradients_reach_pixels(tiny_clip_dir, tiny_open_clip):
    x = torch.rand(2, 3, 40, 36, requires_grad=True)
    arch, ckpt = tiny_open_clip
    for s in (R.load("pickscore", path=tiny_clip_dir, grad=True),
              R.load("hps_v2.1", path=ckpt, arch=arch, grad=True),
              R.load("brightness", target=0.2, grad=True)):
        x.grad = None
        s(x, PROMPTS[:2]).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, s.name
    assert R.load("brightness")(x, None).requires_grad is False  # default: no_grad


def test_bf16_runs_and_returns_float32(tiny_clip_dir, tiny_open_clip, scorers):
    arch, ckpt = tiny_open_clip
    images = make_images(3, seed=8)
    for name, s in (("pickscore", R.load("pickscore", path=tiny_clip_dir, dtype="bf16")),
                    ("hps_v2.1", R.load("hps_v2.1", path=ckpt, arch=arch,
                                        dtype=torch.bfloat16))):
        got = s(images, PROMPTS[:3])
        assert got.dtype == torch.float32
        want = scorers[name](images, PROMPTS[:3])
        torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0)


# --------------------------------------------------------------------------- conformance

ALL = ["pickscore", "clip_score", "aesthetic", "hps_v2", "hps_v2.1", "imagereward",
       "jpeg_compressibility", "brightness", "color", "prompt_color"]


def test_conformance_covers_every_registered_scorer():
    from mmrl.rewards.specs import VIDEO_SCORERS  # video scorers: tests/rewards/test_video.py
    # remote: test_server; hpsv3: test_hpsv3 (a 7B-style model with a 2.5k-character template)
    assert sorted(ALL + ["remote", "hpsv3", *VIDEO_SCORERS]) == R.SCORERS.names()


@pytest.mark.parametrize("name", ALL)
def test_batching_is_invisible(scorers, name):
    s = scorers[name]  # batch_size = 2
    images = make_images(5, seed=11)
    full = s(images, PROMPTS)
    assert full.shape == (5,) and full.dtype == torch.float32 and torch.isfinite(full).all()
    singles = torch.cat([s([im], [p]) for im, p in zip(images, PROMPTS)])
    torch.testing.assert_close(full, singles, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_grayscale_and_rgba_inputs(scorers, name):
    s = scorers[name]
    rgb = make_images(2, size=(32, 32), seed=12)
    prompts = PROMPTS[:2]
    base = s(rgb, prompts)
    gray = [im.convert("L") for im in rgb]
    torch.testing.assert_close(s(gray, prompts), s([g.convert("RGB") for g in gray], prompts))
    rgba = [im.convert("RGBA") for im in rgb]
    for im in rgba:
        im.putalpha(128)  # alpha is dropped, as PIL's convert("RGB") does
    torch.testing.assert_close(s(rgba, prompts), base, atol=1e-5, rtol=1e-5)
    t = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in rgb])).permute(0, 3, 1, 2)
    t = t / 255
    # Tensor path == PIL path: exact up to float error when no resize happens (32 px models);
    # imagereward upsamples to 224, where PIL rounds the resized pixels to uint8 and torch does not.
    tol = 5e-3 if name == "imagereward" else 1e-4
    torch.testing.assert_close(s(t, prompts), base, atol=tol, rtol=tol)
    g = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in gray]))[:, None] / 255
    torch.testing.assert_close(s(g, prompts), s(g.expand(-1, 3, -1, -1).contiguous(), prompts))
    a = torch.cat([t, torch.full_like(t[:, :1], 0.5)], 1)
    torch.testing.assert_close(s(a, prompts), s(t, prompts))


@pytest.mark.parametrize("name", ALL)
def test_core_reward_interface(scorers, name):
    s = scorers[name]
    images = make_images(3, seed=13)
    batch = evaluate_reward(s, images, PROMPTS[:3], [{}] * 3, on_invalid="raise")
    assert batch.names == [s.name]
    torch.testing.assert_close(batch.values[:, 0], s(images, PROMPTS[:3]).cpu())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("images,prompts,err,match", [
    ([], [], ValueError, "empty image list"),
    ("two", ["a"], TypeError, "expected a list of PIL images"),
    ("pil3", ["a", "b"], ValueError, "got 3 images but 2 prompts"),
    ("pil3", "a cat", TypeError, "one string"),
    ("pil1", [3], TypeError, r"prompts\[0\] is int"),
    (torch.zeros(0, 3, 8, 8), [], ValueError, "empty image batch"),
    (torch.zeros(2, 3, 8), ["a", "b"], ValueError, r"expected \[B, C, H, W\]"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"], TypeError, "float"),
    (torch.full((1, 3, 8, 8), 2.0), ["a"], ValueError, "expected \\[0, 1\\]"),
    ("one", ["a"], TypeError, "one PIL image"),
])
def test_rejects_bad_inputs(scorers, name, images, prompts, err, match):
    if isinstance(images, str) and images.startswith("pil"):
        images = make_images(int(images[3:]))
    elif images == "one":
        images = make_images(1)[0]
    with pytest.raises(err, match=match):
        scorers[name](images, prompts)


# --------------------------------------------------------------------------- loading

def test_offline_without_weights_names_what_to_download():
    with pytest.raises(WeightsNotFoundError, match=r"(?s)hf download yuvalkirstain/PickScore_v1.*"
                                                    r"path=DIR"):
        R.load("pickscore")
    with pytest.raises(WeightsNotFoundError, match=r"hf download xswu/HPSv2 HPS_v2.1_compressed"):
        R.load("hps_v2.1")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        R.load("hps_v2", path="/no/such/HPS_v2_compressed.pt")


def test_aesthetic_head_from_directory(tmp_path, aesthetic_head, tiny_clip_dir, scorers):
    images = make_images(2)
    by_dir = R.load("aesthetic", path=os.path.dirname(aesthetic_head[0]), clip_path=tiny_clip_dir)
    torch.testing.assert_close(by_dir(images, None), scorers["aesthetic"](images, None))
    with pytest.raises(WeightsNotFoundError, match="no head file.*aesthetic-model.pth"):
        R.load("aesthetic", path=str(tmp_path), clip_path=tiny_clip_dir)


def test_registry_and_option_errors(tiny_clip_dir):
    with pytest.raises(ValueError, match="did you mean 'pickscore'"):
        R.load("pickscor")
    with pytest.raises(TypeError, match=r"'brightness' does not take 'device'.*it takes: target"):
        R.load("brightness", device="cpu")
    with pytest.raises(ValueError, match="normalize='x'.*div26"):
        R.load("pickscore", path=tiny_clip_dir, normalize="x")
    with pytest.raises(ValueError, match="unknown open_clip arch 'nope'"):
        R.load("hps_v2", arch="nope")


def test_hps_checkpoint_loads_without_pickle(tmp_path, tiny_open_clip):
    arch, ckpt = tiny_open_clip
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": types.SimpleNamespace(a=1)}}, evil)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        R.load("hps_v2", path=str(evil), arch=arch)
    from safetensors.torch import save_file
    st = tmp_path / "hps.safetensors"
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    images = make_images(2)
    torch.testing.assert_close(R.load("hps_v2", path=str(st), arch=arch)(images, PROMPTS[:2]),
                               R.load("hps_v2", path=ckpt, arch=arch)(images, PROMPTS[:2]))


def test_compose_returns_named_weighted_columns(tiny_clip_dir):
    images = make_images(4, seed=21)
    c = R.compose(f"pickscore:path={tiny_clip_dir}:weight=0.5,brightness,brightness:target=0.5")
    cols = c(images, PROMPTS[:4])
    assert list(cols) == ["pickscore", "brightness", "brightness#2"]
    assert c.weights == {"pickscore": 0.5, "brightness": 1.0, "brightness#2": 1.0}
    pick = R.load("pickscore", path=tiny_clip_dir)(images, PROMPTS[:4])
    torch.testing.assert_close(cols["pickscore"], pick)
    torch.testing.assert_close(c.weighted(images, PROMPTS[:4]),
                               0.5 * pick + cols["brightness"] + cols["brightness#2"])
    batch = evaluate_reward(c, images, PROMPTS[:4])
    assert batch.names == ["pickscore", "brightness", "brightness#2"]
    rules = R.compose({"brightness": 2.0, "jpeg_compressibility": {"weight": 1.0, "quality": 80}})
    assert set(rules(images)) == {"brightness", "jpeg_compressibility"}  # prompt-free: no prompts


def test_parse_spec():
    assert R.parse_spec("remote:url=http://127.0.0.1:8000:timeout=5") == (
        "remote", {"url": "http://127.0.0.1:8000", "timeout": 5})
    assert R.parse_specs("color:target=[1,0,0],hps_v2.1:path=/a/b.pt:batch_size=8") == [
        ("color", {"target": [1, 0, 0]}), ("hps_v2.1", {"path": "/a/b.pt", "batch_size": 8})]
