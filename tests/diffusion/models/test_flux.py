"""FLUX (FluxPipeline) passes the flow adapter conformance tests: packed latents, the resolution
shifted schedule, embedded guidance."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conformance import PROMPTS, load  # noqa: E402

from mmrl.diffusion import rescore, sample_singular  # noqa: E402
from mmrl.diffusion.models.base import load_pipeline  # noqa: E402
from mmrl.diffusion.models.flux import FluxAdapter  # noqa: E402

conformance = load()


class TestFluxAdapter(conformance.FlowAdapterConformance):
    FAMILY = "flux"
    SIZE = 16
    KWARGS = {"guidance_scale": 3.5, "max_sequence_length": 16}

    @pytest.fixture(scope="class")
    def tiny_dir(self, tiny_flux_dir):
        """The session's tiny FLUX (16x16, built by FluxAdapter's builder via save_tiny_flux)."""
        return tiny_flux_dir

    def library_velocity(self, transformer, adapter, latents, sigma, cond):
        # FluxPipeline.__call__: timestep t/1000 with t = 1000·σ, guidance embedded, text ids 0,
        # image ids from the pipeline's own _prepare_latent_image_ids
        _, ids = self.pipeline_latents(adapter.pipe, torch.Generator().manual_seed(0), True)
        return transformer(hidden_states=latents, timestep=(sigma * 1000) / 1000,
                           guidance=torch.full((latents.shape[0],), 3.5),
                           pooled_projections=cond["pooled"], encoder_hidden_states=cond["emb"],
                           txt_ids=torch.zeros(cond["emb"].shape[1], 3), img_ids=ids,
                           return_dict=False)[0]

    def pipeline_latents(self, pipe, generator, with_ids=False):
        latents, ids = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4,
                                            self.SIZE, self.SIZE, torch.float32, "cpu", generator)
        return (latents, ids) if with_ids else latents

    def test_schedule_is_the_pipelines_resolution_shifted_one(self, frozen):
        sigmas = frozen.sigmas(4)
        with torch.no_grad():
            frozen.pipe(PROMPTS[:1], height=16, width=16, num_inference_steps=4,
                        guidance_scale=3.5, output_type="latent", max_sequence_length=16)
        assert torch.equal(sigmas, frozen.pipe.scheduler.sigmas.float())  # the call's schedule
        assert float(sigmas[1]) != pytest.approx(0.75)  # the shift moved it off linspace

    def test_the_adapter_is_built_for_one_resolution(self, frozen):
        with pytest.raises(ValueError, match="built for 16x16 .* height=32, width=32"):
            frozen.latent_shape(32, 32)
        with pytest.raises(ValueError, match="shifts its schedule by the resolution"):
            type(frozen)(frozen.pipe, height=16, width=16, finetune="none", shift=3.0)


# ---------------------------------------------------------------- FLUX specifics beyond conformance
def test_lora_reaches_the_single_stream_blocks_and_singular_sampling_keeps_ratio_one(
        tiny_flux_dir):
    flux = FluxAdapter.from_pretrained(tiny_flux_dir, height=16, width=16, guidance_scale=3.5,
                                       max_sequence_length=16)
    names = [n for n, p in flux.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    assert any("single_transformer_blocks" in n for n in names)
    cond = {k: v[:1] for k, v in flux.encode_prompt(PROMPTS).items()}
    x = torch.randn(1, *flux.latent_shape(16, 16))
    traj = sample_singular(flux, x, flux.sigmas(4), cond, group_size=2, steps=[1],
                           granularities=[1, 2], kind="dance", noise_level=0.3,
                           generator=torch.Generator().manual_seed(0))
    out = rescore(traj, flux, cond)
    assert torch.equal(torch.exp(out.logp - traj.logp).detach(), torch.ones(2))


def test_flux_resolution_errors(tiny_flux_dir):
    pipe = load_pipeline("FluxPipeline", tiny_flux_dir)
    with pytest.raises(ValueError, match=r"21x16 is not a positive multiple of 2 .*use 20x16"):
        FluxAdapter(pipe, height=21, width=16, finetune="none")
    assert not getattr(pipe.transformer, "peft_config", None)  # refused before any LoRA
    with pytest.raises(FileNotFoundError, match="FluxPipeline"):
        FluxAdapter.from_pretrained("org/missing-flux")


def test_prompt_lengths_over_max_sequence_length_warn_and_over_the_encoder_fail(tiny_flux_dir):
    pipe = load_pipeline("FluxPipeline", tiny_flux_dir)
    flow = FluxAdapter(pipe, height=16, width=16, finetune="none", max_sequence_length=8)
    short, long = "a cat", "a cat " * 20
    counts = flow.prompt_lengths([short, long])
    assert counts[0] <= 8 < counts[1]  # T5 tokens (the byte-level tiny tokenizer's pieces)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow.check_prompts([short, short])  # nothing to cut: silent
    with pytest.warns(UserWarning, match=rf"1 of 2 training prompts .*max_sequence_length=8 .*"
                                         rf"#1 \({counts[1]} tokens\).*Raise .* to {counts[1]}"):
        flow.check_prompts([short, long], "training prompts")
    pipe.tokenizer_2.model_max_length = 16  # the encoder's own limit
    with pytest.raises(ValueError, match=rf"1 of 2 prompts are longer than the 16 tokens Flux's "
                                         rf"text encoder reads: #1 \({counts[1]} tokens\)"):
        flow.check_prompts([short, long])
    with pytest.raises(ValueError, match="max_sequence_length=32 but Flux's text encoder reads "
                                         "at most 16 tokens; set max_sequence_length <= 16"):
        FluxAdapter(pipe, height=16, width=16, finetune="none", max_sequence_length=32)
