"""Export of the SD3 / FLUX policies: what diffusers loads (from_pretrained, load_lora_weights)
gives the live policy's velocity (LoRA adapter, LoRA merged, full), and exporting changes nothing
in the live policy."""
from __future__ import annotations

import json
import os

import pytest
import torch

from mmrl.diffusion.export import MANIFEST, export_flow_policy, merged_state_dict

TOL = 1e-5
PROMPTS = ["a red apple", "a blue sky"]
FLUX_NONE = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


@pytest.fixture(scope="module")
def tiny_flux_path(tmp_path_factory):
    """A tiny FluxPipeline without text encoders (saved as absent: cond rows are given
    directly), written by save_pretrained; 16x16 images."""
    from mmrl.diffusion.models.flux import save_tiny_flux
    return str(save_tiny_flux(tmp_path_factory.mktemp("tiny_flux_export"), size=16,
                              with_text_encoders=False))


def _policy(kind, base, finetune, **kw):
    from mmrl.diffusion.models.flux import FluxAdapter
    from mmrl.diffusion.models.sd3 import SD3Adapter
    torch.manual_seed(0)
    if kind == "sd3":
        return SD3Adapter.from_pretrained(base, finetune=finetune, lora_rank=4, lora_alpha=8,
                                         guidance_scale=4.5, max_sequence_length=8, **kw)
    return FluxAdapter.from_pretrained(base, pipeline_kwargs=FLUX_NONE, finetune=finetune,
                                      lora_rank=4, lora_alpha=8, height=16, width=16, **kw)


def _inputs(policy, kind):
    """Fixed latents, noise levels and cond rows ([2, ...])."""
    g = torch.Generator().manual_seed(3)
    shape = policy.latent_shape(8, 8) if kind == "sd3" else policy.latent_shape()
    x = torch.randn((2, *shape), generator=g)
    sigma = torch.tensor([0.7, 0.3])
    if kind == "sd3":
        return x, sigma, policy.encode(PROMPTS)
    return x, sigma, {"emb": torch.randn(2, 8, 32, generator=g),
                      "pooled": torch.randn(2, 32, generator=g)}


def _train_like(policy, seed=1):
    """Perturb the trainable weights as training would (LoRA B starts at zero: make it not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if p.requires_grad and (policy.finetune != "lora" or "lora_B" in name):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _velocity(policy, inputs):
    with torch.no_grad():
        return policy(*inputs)


def _load(kind, path, base=None):
    """The export through diffusers' public API, wrapped (without fine-tuning) as a policy."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from mmrl.diffusion.models.flux import FluxAdapter
    from mmrl.diffusion.models.sd3 import SD3Adapter
    if kind == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(base or path, text_encoder_3=None,
                                                        tokenizer_3=None)
    else:
        pipe = FluxPipeline.from_pretrained(base or path, **FLUX_NONE)
    if base is not None:
        pipe.load_lora_weights(path)
    if kind == "sd3":
        return SD3Adapter(pipe, finetune="none", guidance_scale=4.5, max_sequence_length=8)
    return FluxAdapter(pipe, finetune="none", height=16, width=16)


def _base(kind, tiny_sd3_path, tiny_flux_path):
    return tiny_sd3_path if kind == "sd3" else tiny_flux_path


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("finetune,merge", [("lora", False), ("lora", True), ("full", False)])
def test_export_loads_to_the_same_velocity(tiny_sd3_path, tiny_flux_path, tmp_path, kind,
                                           finetune, merge):
    base = _base(kind, tiny_sd3_path, tiny_flux_path)
    policy = _policy(kind, base, finetune)
    _train_like(policy)
    inputs = _inputs(policy, kind)
    before = _velocity(policy, inputs)
    assert (before - _velocity(_load(kind, base), inputs)).abs().max() > 1e-3  # trained != base
    out = export_flow_policy(policy, str(tmp_path / "export"), merge_lora=merge)

    assert out == str(tmp_path / "export")
    files = set(os.listdir(out))
    adapter = finetune == "lora" and not merge
    assert (files == {"pytorch_lora_weights.safetensors", MANIFEST}) is adapter
    assert ("model_index.json" in files) is not adapter
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    assert manifest["pipeline_class"] == type(policy.pipe).__name__
    assert manifest["finetune"] == finetune and manifest["merged"] is merge
    assert manifest["base_model"] == base
    assert ("load_lora_weights" in manifest["load"]) is adapter
    if not adapter:
        assert ("text_encoder_3=None" in manifest["load"]) is (kind == "sd3")

    loaded = _load(kind, out, base if adapter else None)
    if not adapter:  # a plain diffusers transformer: no LoRA layers left after merging
        assert not any("lora" in k for k in loaded.transformer.state_dict())
    if kind == "sd3":  # text encoders and tokenizers came through too
        for k, v in loaded.encode(PROMPTS).items():
            torch.testing.assert_close(v, inputs[2][k], atol=0, rtol=0)
    torch.testing.assert_close(_velocity(loaded, inputs), before, atol=TOL, rtol=0)


def test_lora_export_leaves_the_live_policy_training_as_before(tiny_sd3_path, tmp_path):
    exported, control = (_policy("sd3", tiny_sd3_path, "lora") for _ in range(2))
    for p in (exported, control):
        _train_like(p)
    inputs = _inputs(exported, "sd3")
    state = {k: v.clone() for k, v in exported.transformer.state_dict().items()}
    export_flow_policy(exported, str(tmp_path / "a"), merge_lora=True)
    export_flow_policy(exported, str(tmp_path / "b"))

    after = exported.transformer.state_dict()
    assert after.keys() == state.keys()  # adapter still there, nothing merged or unloaded
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    assert not any(getattr(m, "merged", False) for m in exported.transformer.modules())
    # LoRA still active and switchable: the reference (adapter off) differs from the policy
    assert (exported.reference(*inputs) - _velocity(exported, inputs)).abs().max() > 1e-3
    for p in (exported, control):  # one SGD step: the exported policy trains like the other
        opt = torch.optim.SGD(p.trainable_parameters(), lr=0.1)
        p(*inputs).square().mean().backward()
        opt.step()
    for (k, a), b in zip(exported.transformer.state_dict().items(),
                         control.transformer.state_dict().values()):
        assert torch.equal(a, b), k
    key = next(k for k in state if "lora_B" in k)
    assert not torch.equal(exported.transformer.state_dict()[key], state[key])


def test_merged_state_dict_is_w_plus_scaled_ba(tiny_sd3_path):
    policy = _policy("sd3", tiny_sd3_path, "lora")  # rank 4, alpha 8: scaling 2
    _train_like(policy)
    layer = policy.transformer.transformer_blocks[0].attn.to_q
    merged = merged_state_dict(policy.transformer)
    expected = (layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight
                @ layer.lora_A["default"].weight)
    torch.testing.assert_close(merged["transformer_blocks.0.attn.to_q.weight"],
                               expected.detach(), atol=1e-6, rtol=0)
    assert merged.keys() == _policy("sd3", tiny_sd3_path, "none").transformer.state_dict().keys()


def test_untrained_policy_exports_the_pipeline_and_reexport_replaces(tiny_sd3_path, tmp_path):
    target = str(tmp_path / "out")
    lora = _policy("sd3", tiny_sd3_path, "lora")
    _train_like(lora)
    export_flow_policy(lora, target)
    assert os.listdir(target) != [] and "model_index.json" not in os.listdir(target)
    plain = _policy("sd3", tiny_sd3_path, "none")
    export_flow_policy(plain, target)  # the adapter export is replaced by a whole pipeline
    files = set(os.listdir(target))
    assert "model_index.json" in files and "pytorch_lora_weights.safetensors" not in files
    assert json.load(open(os.path.join(target, MANIFEST)))["finetune"] == "none"
    assert os.listdir(tmp_path) == ["out"]  # no temporary folders left
    inputs = _inputs(plain, "sd3")
    torch.testing.assert_close(_velocity(_load("sd3", target), inputs), _velocity(plain, inputs),
                               atol=TOL, rtol=0)


def test_bad_targets_and_arguments_raise_clear_errors(tiny_sd3_path, tmp_path):
    policy = _policy("sd3", tiny_sd3_path, "full")
    a_file = tmp_path / "weights.safetensors"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        export_flow_policy(policy, str(a_file))
    assert a_file.read_text() == "x"
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an earlier export"):
        export_flow_policy(policy, str(other))
    assert os.listdir(other) == ["notes.txt"]
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export_flow_policy(policy, str(tmp_path / "new"), merge_lora=True)
    assert not (tmp_path / "new").exists()
