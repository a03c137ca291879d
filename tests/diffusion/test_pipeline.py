"""SD3Policy on a tiny SD3 pipeline saved to a temp dir and loaded by path, as a user's would be."""
import warnings

import pytest
import torch

from mmrl.diffusion import flow_sigmas, rescore, sample_sde
from mmrl.diffusion.pipeline import SD3Policy, load_sd3_pipeline

PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def base_pipe(tiny_sd3_dir):
    return load_sd3_pipeline(tiny_sd3_dir)


def _policy(tiny_sd3_dir, **kw):
    kw.setdefault("max_sequence_length", 8)
    return SD3Policy.from_pretrained(tiny_sd3_dir, **kw)


@pytest.fixture(scope="module")
def sampler_policy(tiny_sd3_dir):
    """Sampling only, CFG 3.0 (shared by the tests that do not change weights)."""
    return _policy(tiny_sd3_dir, guidance_scale=3.0, finetune="none")


@pytest.fixture(scope="module")
def lora_policy(tiny_sd3_dir):
    return _policy(tiny_sd3_dir, guidance_scale=1.0)


def test_ode_sampling_and_decode_equal_the_diffusers_pipeline(sampler_policy):
    policy = sampler_policy
    noise = torch.randn(2, *policy.latent_shape(8, 8), generator=torch.Generator().manual_seed(0))
    traj = sample_sde(policy, noise, flow_sigmas(4, 3.0), policy.encode(PROMPTS), sde_steps=[])
    images = policy.decode(traj.final)
    with torch.no_grad():
        expected = policy.pipe(PROMPTS, height=8, width=8, num_inference_steps=4,
                               guidance_scale=3.0, latents=noise.clone(), output_type="pt",
                               max_sequence_length=8).images
    assert images.shape == (2, 3, 8, 8) and float(images.min()) >= 0 and float(images.max()) <= 1
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    assert traj.nfe == 8  # 2 samples x 4 steps (the CFG forward is 2 rows each inside)


def test_prompt_embeddings_are_computed_once_per_prompt(tiny_sd3_dir):
    policy = _policy(tiny_sd3_dir, guidance_scale=1.0, finetune="none")  # a fresh cache
    seen = []
    encode = policy.pipe.encode_prompt

    def counting(*args, **kwargs):
        seen.append(list(kwargs["prompt"]))
        return encode(*args, **kwargs)

    policy.pipe.encode_prompt = counting
    cond = policy.encode(["b", "a", "b", "a"])
    policy.encode(["a", "b"])
    assert seen == [["a", "b"]]  # one call, each distinct text once, the second call cached
    assert set(cond) == {"emb", "pooled"}  # guidance 1: no unconditional branch
    direct = encode(prompt=["b"], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                    max_sequence_length=8)
    assert torch.equal(cond["emb"][0], direct[0][0]) and torch.equal(cond["emb"][0], cond["emb"][2])


def test_velocity_cfg_and_timestep_convention(sampler_policy):
    policy = sampler_policy
    cond = policy.encode(PROMPTS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        def raw(emb, pooled):
            return policy.transformer(hidden_states=x, timestep=sigma * 1000,
                                      encoder_hidden_states=emb, pooled_projections=pooled).sample
        v_c, v_u = raw(cond["emb"], cond["pooled"]), raw(cond["neg_emb"], cond["neg_pooled"])
        v = policy(x, sigma, cond)
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), rtol=0, atol=1e-5)


def test_lora_trains_only_the_adapter_and_reference_is_the_base(lora_policy, base_pipe):
    policy = lora_policy
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert any("attn.to_q" in n for n in names) and any("attn.add_k_proj" in n for n in names)
    lora_a = next(m for n, m in policy.transformer.named_modules() if n.endswith("attn.to_q"))
    assert lora_a.r["default"] == 32 and lora_a.scaling["default"] == 2.0  # alpha 64 / r 32
    cond = policy.encode(PROMPTS)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.7])
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # an "updated" adapter
        base = base_pipe.transformer(hidden_states=x, timestep=sigma * 1000,
                                     encoder_hidden_states=cond["emb"],
                                     pooled_projections=cond["pooled"]).sample
        policy_v = policy(x, sigma, cond)
    ref_v = policy.reference(x, sigma, cond)
    torch.testing.assert_close(ref_v, base, rtol=0, atol=1e-6)
    assert (policy_v - base).abs().max() > 1e-3
    assert torch.equal(policy(x, sigma, cond).detach(), policy_v)  # adapter re-enabled after ref
    traj = sample_sde(policy, x, flow_sigmas(3), cond, generator=torch.Generator().manual_seed(0))
    rescore(traj, policy, cond).logp.sum().backward()
    grads = {n: p.grad for n, p in policy.transformer.named_parameters() if p.grad is not None}
    assert grads and set(grads) <= set(names)  # only the adapter gets gradients, and they are
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())  # finite and not all 0
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_full_finetune_reference_is_a_frozen_copy(tiny_sd3_dir):
    policy = _policy(tiny_sd3_dir, guidance_scale=1.0, finetune="full")
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))
    cond = policy.encode(PROMPTS)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    before = policy.reference(x, sigma, cond)
    with torch.no_grad():
        for p in policy.transformer.parameters():
            p.add_(0.05)
    torch.testing.assert_close(policy.reference(x, sigma, cond), before, rtol=0, atol=0)
    assert (policy(x, sigma, cond).detach() - before).abs().max() > 1e-3


def test_ratio_is_exactly_one_with_the_policy(lora_policy):
    policy = lora_policy
    cond = policy.encode(PROMPTS)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sig = flow_sigmas(4, 3.0)
    traj = sample_sde(policy, noise, sig, cond, generator=torch.Generator().manual_seed(3))
    for t in range(3):
        idx = (traj.step == t).nonzero().flatten()
        out = rescore(traj, policy, cond, index=idx)
        assert torch.equal(torch.exp(out.logp - traj.logp[idx]).detach(), torch.ones(2))


def test_bad_inputs_are_reported(sampler_policy, tmp_path):
    policy = sampler_policy
    policy.pipe.vae_scale_factor = 8  # as a real SD3 VAE: 512 px -> 64 latents
    with pytest.raises(ValueError, match=r"100x64 is not a positive multiple of 8 .* use 96x64"):
        policy.latent_shape(100, 64)
    assert policy.latent_shape(96, 64) == (4, 12, 8)
    policy.pipe.vae_scale_factor = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy.encode(["x" * 200, "short"])
    assert any("1 of 2 prompts are longer than CLIP's 77 tokens" in str(w.message)
               for w in caught)
    with pytest.raises(ValueError, match="non-empty list"):
        policy.encode([])
    with pytest.raises(ValueError, match="finetune"):
        SD3Policy(policy.pipe, finetune="qlora")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download org/missing-sd3"):
        SD3Policy.from_pretrained("org/missing-sd3")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        SD3Policy.from_pretrained(str(tmp_path))
