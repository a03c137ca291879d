"""FluxPolicy on a tiny FLUX pipeline saved to a temp dir and loaded by path."""
import pytest
import torch

from mmrl.diffusion import rescore, sample_sde, sample_singular
from mmrl.diffusion.pipeline import FluxPolicy, load_pipeline

PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def flux(tiny_flux_dir):
    return FluxPolicy.from_pretrained(tiny_flux_dir, height=16, width=16, guidance_scale=3.5,
                                      max_sequence_length=16)


def test_ode_sampling_schedule_and_decode_equal_the_flux_pipeline(flux):
    shape = flux.latent_shape()
    assert shape == (64, 16)  # 16x16 px, VAE factor 1, 2x2 packing -> 8x8 tokens of 4·4 channels
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    sigmas = flux.sigmas(4)
    traj = sample_sde(flux, noise, sigmas, flux.encode(PROMPTS), sde_steps=[])
    with torch.no_grad():
        expected = flux.pipe(PROMPTS, height=16, width=16, num_inference_steps=4,
                             guidance_scale=3.5, latents=noise.clone(), output_type="pt",
                             max_sequence_length=16).images
    assert torch.equal(sigmas, flux.pipe.scheduler.sigmas.float())  # the call set the same schedule
    assert float(sigmas[1]) != pytest.approx(0.75)  # the resolution shift moved it off linspace
    torch.testing.assert_close(flux.decode(traj.final), expected, rtol=0, atol=1e-5)


def test_lora_reference_and_ratio_one_on_packed_latents(flux, tiny_flux_dir):
    names = [n for n, p in flux.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert any("single_transformer_blocks" in n for n in names)
    cond = flux.encode(PROMPTS)
    x, sigma = torch.randn(2, *flux.latent_shape()), torch.tensor([0.8, 0.3])
    base = load_pipeline("FluxPipeline", tiny_flux_dir).transformer
    with torch.no_grad():
        for n, p in flux.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        expected = base(hidden_states=x, timestep=(sigma * 1000) / 1000,
                        guidance=torch.full((2,), 3.5), pooled_projections=cond["pooled"],
                        encoder_hidden_states=cond["emb"], txt_ids=torch.zeros(16, 3),
                        img_ids=flux._img_ids, return_dict=False)[0]
        assert (flux(x, sigma, cond) - expected).abs().max() > 1e-3
    torch.testing.assert_close(flux.reference(x, sigma, cond), expected, rtol=0, atol=1e-6)
    traj = sample_singular(flux, x[:1], flux.sigmas(4), {k: v[:1] for k, v in cond.items()},
                           group_size=2, steps=[1], granularities=[1, 2], kind="dance",
                           noise_level=0.3, generator=torch.Generator().manual_seed(0))
    out = rescore(traj, flux, {k: v[:1] for k, v in cond.items()})
    assert torch.equal(torch.exp(out.logp - traj.logp).detach(), torch.ones(2))


def test_flux_resolution_error(flux):
    with pytest.raises(ValueError, match=r"21x16 is not a positive multiple of 2 .*use 20x16"):
        FluxPolicy(flux.pipe, height=21, width=16, finetune="none")
    with pytest.raises(FileNotFoundError, match="FluxPipeline"):
        FluxPolicy.from_pretrained("org/missing-flux")
