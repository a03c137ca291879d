"""SD3 (StableDiffusion3Pipeline) passes the flow adapter conformance tests, with CFG on; and
what is SD3's own (prompt cache, LoRA targets, full fine-tuning, input errors)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conformance import PROMPTS, load  # noqa: E402

from mmrl.diffusion import flow_sigmas, rescore, sample_sde  # noqa: E402
from mmrl.diffusion.models.sd3 import SD3Adapter  # noqa: E402

conformance = load()


class TestSD3Adapter(conformance.FlowAdapterConformance):
    FAMILY = "sd3"
    SIZE = 8
    KWARGS = {"guidance_scale": 3.0, "max_sequence_length": 8}

    @pytest.fixture(scope="class")
    def tiny_dir(self, tiny_sd3_dir):
        """The session's tiny SD3 (8x8, built by SD3Adapter.build_tiny via save_tiny_sd3)."""
        return tiny_sd3_dir

    def library_velocity(self, transformer, adapter, latents, sigma, cond):
        # StableDiffusion3Pipeline.__call__: one forward on [uncond; cond], t = 1000·σ, then
        # noise_pred_uncond + w (noise_pred_text − noise_pred_uncond)
        out = transformer(hidden_states=torch.cat([latents, latents]),
                          timestep=torch.cat([sigma, sigma]) * 1000,
                          encoder_hidden_states=torch.cat([cond["neg_emb"], cond["emb"]]),
                          pooled_projections=torch.cat([cond["neg_pooled"], cond["pooled"]]),
                          return_dict=False)[0]
        uncond, text = out.chunk(2)
        return uncond + self.KWARGS["guidance_scale"] * (text - uncond)

    def pipeline_latents(self, pipe, generator):
        return pipe.prepare_latents(1, pipe.transformer.config.in_channels, self.SIZE, self.SIZE,
                                    torch.float32, "cpu", generator)

    def test_schedule_is_the_scheduler_configs_shift(self, frozen):
        from mmrl.diffusion import flow_sigmas
        assert frozen.pipe.scheduler.config.shift == 3.0
        assert torch.equal(frozen.sigmas(4), flow_sigmas(4, 3.0))
        frozen.pipe.scheduler.set_timesteps(4)
        torch.testing.assert_close(frozen.sigmas(4), frozen.pipe.scheduler.sigmas.float(),
                                   rtol=0, atol=1e-6)

    def test_unknown_pipeline_classes_and_mismatched_families_are_named(self, tiny_dir,
                                                                        tmp_path):
        from mmrl.diffusion.models import adapter_class, family_of_class, resolve_family
        with pytest.raises(ValueError, match=r"'CogVideoXPipeline'; supported: sd3 \(StableDiffusion3"
                                             r"Pipeline\), flux \(FluxPipeline\)"):
            family_of_class("CogVideoXPipeline")
        with pytest.raises(ValueError, match="did you mean 'flux'"):
            adapter_class("flx")
        with pytest.raises(ValueError, match="adapts FluxPipeline but .* is a "
                                             "StableDiffusion3Pipeline; set diffusion.pipeline="
                                             "auto \\(or sd3\\)"):
            resolve_family("flux", tiny_dir)
        with pytest.raises(ValueError, match="cannot be read .* set diffusion.pipeline"):
            resolve_family("auto", str(tmp_path))
        assert resolve_family("sd3", str(tmp_path)) == "sd3"  # nothing to check it against


# ---------------------------------------------------------------- SD3 specifics beyond conformance
def _adapter(tiny_sd3_dir, **kw):
    kw.setdefault("max_sequence_length", 8)
    return SD3Adapter.from_pretrained(tiny_sd3_dir, height=8, width=8, **kw)


def test_prompt_embeddings_are_computed_once_per_prompt(tiny_sd3_dir):
    adapter = _adapter(tiny_sd3_dir, guidance_scale=1.0, finetune="none")  # a fresh cache
    seen = []
    encode = adapter.pipe.encode_prompt

    def counting(*args, **kwargs):
        seen.append(list(kwargs["prompt"]))
        return encode(*args, **kwargs)

    adapter.pipe.encode_prompt = counting
    cond = adapter.encode_prompt(["b", "a", "b", "a"])
    adapter.encode_prompt(["a", "b"])
    assert seen == [["a", "b"]]  # one call, each distinct text once, the second call cached
    assert set(cond) == {"emb", "pooled"}  # guidance 1: no unconditional branch
    direct = encode(prompt=["b"], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                    max_sequence_length=8)
    assert torch.equal(cond["emb"][0], direct[0][0]) and torch.equal(cond["emb"][0], cond["emb"][2])


def test_lora_trains_only_the_adapter(tiny_sd3_dir):
    adapter = _adapter(tiny_sd3_dir, guidance_scale=1.0)
    names = [n for n, p in adapter.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert any("attn.to_q" in n for n in names) and any("attn.add_k_proj" in n for n in names)
    lora_a = next(m for n, m in adapter.transformer.named_modules() if n.endswith("attn.to_q"))
    assert lora_a.r["default"] == 32 and lora_a.scaling["default"] == 2.0  # alpha 64 / r 32
    cond = adapter.encode_prompt(PROMPTS)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for n, p in adapter.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # an "updated" adapter
        policy_v = adapter(x, torch.tensor([0.7, 0.7]), cond)
    adapter.reference(x, torch.tensor([0.7, 0.7]), cond)
    assert torch.equal(adapter(x, torch.tensor([0.7, 0.7]), cond).detach(), policy_v)  # re-enabled
    traj = sample_sde(adapter, x, flow_sigmas(3), cond, generator=torch.Generator().manual_seed(0))
    rescore(traj, adapter, cond).logp.sum().backward()
    grads = {n: p.grad for n, p in adapter.transformer.named_parameters() if p.grad is not None}
    assert grads and set(grads) <= set(names)  # only the adapter gets gradients, and they are
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())  # finite and not all 0
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_full_finetune_reference_is_a_frozen_copy(tiny_sd3_dir):
    adapter = _adapter(tiny_sd3_dir, guidance_scale=1.0, finetune="full")
    assert len(adapter.trainable_parameters()) == len(list(adapter.transformer.parameters()))
    cond = adapter.encode_prompt(PROMPTS)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    before = adapter.reference(x, sigma, cond)
    with torch.no_grad():
        for p in adapter.transformer.parameters():
            p.add_(0.05)
    torch.testing.assert_close(adapter.reference(x, sigma, cond), before, rtol=0, atol=0)
    assert (adapter(x, sigma, cond).detach() - before).abs().max() > 1e-3


def test_bad_inputs_are_reported(tiny_sd3_dir, tmp_path):
    adapter = _adapter(tiny_sd3_dir, guidance_scale=3.0, finetune="none")
    adapter.pipe.vae_scale_factor = 8  # as a real SD3 VAE: 512 px -> 64 latents
    with pytest.raises(ValueError, match=r"100x64 is not a positive multiple of 8 .* use 96x64"):
        adapter.latent_shape(100, 64)
    assert adapter.latent_shape(96, 64) == (4, 12, 8)
    adapter.pipe.vae_scale_factor = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter.encode_prompt(["x" * 200, "short"])
    assert any("1 of 2 prompts are longer than CLIP's 77 tokens" in str(w.message)
               for w in caught)
    with pytest.raises(ValueError, match="non-empty list"):
        adapter.encode_prompt([])
    with pytest.raises(ValueError, match="finetune"):
        SD3Adapter(adapter.pipe, finetune="qlora")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download org/missing-sd3"):
        SD3Adapter.from_pretrained("org/missing-sd3")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        SD3Adapter.from_pretrained(str(tmp_path))


def test_cfg_uncond_grad_false_is_flow_grpos_detached_unconditional_half(tiny_sd3_dir):
    """``cfg_uncond_grad=False`` (flow_grpo's ``train_sd3.py``: ``noise_pred_uncond.detach()``):
    the same guided velocity, and the gradient of w·v_cond + (1 − w)·sg(v_uncond) — not the
    exact gradient, which also flows through v_uncond; without gradient both paths are one."""
    adapter = _adapter(tiny_sd3_dir, guidance_scale=4.5, finetune="full")
    cond = adapter.encode_prompt(PROMPTS)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.6, 0.3])
    params = adapter.trainable_parameters()
    w = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def grads(fn):
        for p in params:
            p.grad = None
        v = fn()
        (v * w).sum().backward()
        return v.detach(), [p.grad.clone() for p in params]

    exact_v, exact_g = grads(lambda: adapter(x, sigma, cond))
    adapter.cfg_uncond_grad = False
    cut_v, cut_g = grads(lambda: adapter(x, sigma, cond))
    with adapter.guidance(1.0):  # the two predictions alone
        v_cond = adapter(x, sigma, cond)
        uncond = dict(cond, emb=cond["neg_emb"], pooled=cond["neg_pooled"])
        v_uncond = adapter(x, sigma, uncond)
    want_v = v_uncond + 4.5 * (v_cond - v_uncond)
    torch.testing.assert_close(cut_v, exact_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cut_v, want_v.detach(), rtol=1e-5, atol=1e-5)
    _, want_g = grads(lambda: v_uncond.detach() + 4.5 * (v_cond - v_uncond.detach()))
    for a, b, c in zip(cut_g, want_g, exact_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max(float((a - c).abs().max()) for a, c in zip(cut_g, exact_g)) > 1e-4
    with torch.no_grad():
        torch.testing.assert_close(adapter(x, sigma, cond), exact_v, rtol=1e-5, atol=1e-5)


def test_the_demos_linear_vae_decodes_a_colour_latent_to_that_colour():
    """vae="linear": rgb = 0.5 + 0.5·gain·M·latent/scaling_factor (gain 1), M orthonormal rows,
    so the latent scale/gain·Mᵀ(2c − 1) decodes to colour c exactly, for every RGB cube corner."""
    from mmrl.diffusion.models.sd3 import build_tiny_sd3
    from mmrl.diffusion.models.tiny_parts import LINEAR_VAE_RGB, linear_vae
    vae = linear_vae(4, shift_factor=0.0609, scaling_factor=1.5035)
    m = torch.tensor(LINEAR_VAE_RGB)
    torch.testing.assert_close(m @ m.T, torch.eye(3))
    corners = torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0], [1, 1, 0]])
    latents = (1.5035 / 1.0 * (2 * corners - 1) @ m)[:, :, None, None].expand(6, 4, 4, 4)
    with torch.no_grad():
        rgb = vae.decode(latents / 1.5035 + 0.0609, return_dict=False)[0] / 2 + 0.5
    torch.testing.assert_close(rgb.mean((2, 3)), corners, rtol=0, atol=2e-3)
    half = latents * 0.5  # half-way latents decode half-way to grey: linear, not saturated
    with torch.no_grad():
        rgb = vae.decode(half / 1.5035 + 0.0609, return_dict=False)[0] / 2 + 0.5
    torch.testing.assert_close(rgb.mean((2, 3)), 0.25 + corners / 2, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match=r"vae='linaer'; expected one of \('random', 'linear'\)"):
        build_tiny_sd3(4, vae="linaer")
