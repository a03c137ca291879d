"""Z-Image (ZImagePipeline) passes the flow adapter conformance tests with CFG on; and what is
Z-Image's own: the shifted linspace schedule, the negated output and the (1000 − t)/1000 timestep,
CFG truncation and renormalisation as the pipeline applies them, per-prompt text lengths, the
chat template's tokens, resolution errors."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conformance import load  # noqa: E402

from mmrl.diffusion import sample_sde  # noqa: E402
from mmrl.diffusion.models.base import load_pipeline  # noqa: E402
from mmrl.diffusion.models.z_image import ZImageAdapter, save_tiny_z_image  # noqa: E402

conformance = load()
PROMPTS = conformance.PROMPTS  # the list the inherited tests use (load()'s module)
SIZE, W = 8, 2.0


@pytest.fixture(scope="session")
def tiny_z_image_dir(tmp_path_factory):
    """A directory written by ``ZImagePipeline.save_pretrained`` (tiny, random, 8x8 images)."""
    return str(save_tiny_z_image(tmp_path_factory.mktemp("tiny_z_image"), size=SIZE))


def transformer_out(transformer, latents, sigma, caps):
    """``ZImagePipeline.__call__``'s forward: latents as a list of [C, 1, h, w], the timestep
    (1000 − t)/1000 with t = 1000·σ, per-sample caption states -> the raw output [n, C, h, w]."""
    t = (1000 - sigma * 1000) / 1000
    out = transformer(list(latents.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    return torch.stack([o.float() for o in out]).squeeze(2)


class TestZImageAdapter(conformance.FlowAdapterConformance):
    FAMILY = "z_image"
    # The transformer concatenates every sample's tokens into one matmul, so another
    # micro-batch size rounds a few near-zero gradient entries differently (measured: 3 of 3072
    # off by <= 4.4e-9): 1e-6 of the largest gradient instead of 1e-9 absolute.
    GRAD_ATOL = 1e-6
    SIZE = SIZE
    KWARGS = {"guidance_scale": W, "max_sequence_length": 48}
    STEPS = 3  # the inherited sampling tests at 3 steps: the CFG forward runs 4 rows per call

    @pytest.fixture(scope="class")
    def tiny_dir(self, tiny_z_image_dir):
        return tiny_z_image_dir

    def library_velocity(self, transformer, adapter, latents, sigma, cond):
        # the pipeline's CFG on [cond; uncond] rows, pred = pos + w (pos − neg), then negated
        caps, negs = adapter.pipe.encode_prompt(list(PROMPTS), max_sequence_length=48)
        out = transformer_out(transformer, torch.cat([latents, latents]),
                              torch.cat([sigma, sigma]), caps + negs)
        pos, neg = out.chunk(2)
        return -(pos + W * (pos - neg))

    def pipeline_latents(self, pipe, generator):
        return pipe.prepare_latents(1, pipe.transformer.in_channels, self.SIZE, self.SIZE,
                                    torch.float32, "cpu", generator)

    def test_schedule_is_the_pipelines_shifted_linspace(self, frozen):
        with torch.no_grad():
            frozen.pipe(PROMPTS[:1], height=SIZE, width=SIZE, num_inference_steps=4,
                        guidance_scale=0.0, output_type="latent", max_sequence_length=48)
        assert torch.equal(frozen.sigmas(4), frozen.pipe.scheduler.sigmas.float())
        # linspace(1, 1/4, 4) = [1, .75, .5, .25] through shift 3: 3s / (1 + 2s)
        torch.testing.assert_close(frozen.sigmas(4),
                                   torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]), rtol=0, atol=1e-6)
        other = type(frozen)(frozen.pipe, height=SIZE, width=SIZE, finetune="none", shift=1.0)
        torch.testing.assert_close(other.sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))

    def test_velocity_is_the_negated_output_at_timestep_one_minus_sigma(self, frozen):
        x, sigma, _ = self.inputs(frozen)
        with frozen.unguided(), torch.no_grad():
            cond = frozen.encode_prompt(PROMPTS)
            assert set(cond) == {"emb", "mask"}  # no unconditional rows without CFG
            caps, _ = frozen.pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False,
                                                max_sequence_length=48)
            raw = transformer_out(frozen.transformer, x, sigma, caps)
            torch.testing.assert_close(frozen.velocity(x, sigma, cond), -raw, rtol=0, atol=0)
            # σ as the timestep (SD3's convention) is another prediction
            flipped = transformer_out(frozen.transformer, x, 1 - sigma, caps)
            assert (flipped - raw).abs().max() > 1e-3
            # the pipeline's scheduler step on its noise_pred (-raw) is mmrl's Euler step on v
            sched = frozen.pipe.scheduler
            sched.set_timesteps(sigmas=[1.0, 0.5], mu=0.0)
            s0, s1 = sched.sigmas[:1], sched.sigmas[1:2]
            raw0 = transformer_out(frozen.transformer, x[:1], s0, caps[:1])
            step = sched.step(-raw0, sched.timesteps[0], x[:1], return_dict=False)[0]
            v = frozen.velocity(x[:1], s0, {k: c[:1] for k, c in cond.items()})
            torch.testing.assert_close(step, x[:1] + (s1 - s0) * v, rtol=0, atol=1e-6)

    def test_cfg_truncation_and_normalisation_sample_as_the_pipeline(self, frozen):
        flow = ZImageAdapter(frozen.pipe, height=SIZE, width=SIZE, finetune="none",
                             guidance_scale=4.0, max_sequence_length=48, cfg_truncation=0.3,
                             cfg_normalization=1.0)
        noise = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        cond = flow.encode_prompt(PROMPTS)
        traj = sample_sde(flow, noise, flow.sigmas(3), cond, sde_steps=[])
        with torch.no_grad():
            expected = flow.pipe(list(PROMPTS), height=SIZE, width=SIZE, num_inference_steps=3,
                                 guidance_scale=4.0, cfg_truncation=0.3, cfg_normalization=1.0,
                                 latents=noise.clone(), output_type="pt",
                                 max_sequence_length=48).images
        torch.testing.assert_close(flow.decode(traj.final), expected, rtol=0, atol=1e-5)
        # both rules acted: schedule 1, .857, .6 -> t = (1000 − 1000σ)/1000 = 0, .143, .4, so
        # the last step runs unguided; at σ = 1 the guided norm was cut to ‖v_c‖
        t = (1000 - flow.sigmas(3)[:3] * 1000) / 1000
        assert flow._guided_rows(t).tolist() == [True, True, False]
        with torch.no_grad():
            sigma = torch.ones(2)
            v = flow.velocity(noise, sigma, cond)
            with flow.unguided():
                v_c = flow.velocity(noise, sigma, cond)
            flow.cfg_normalization = 0.0
            plain = flow.velocity(noise, sigma, cond)
        norm = torch.linalg.vector_norm
        for i in range(2):
            assert norm(plain[i]) > norm(v_c[i]) * 1.01
            torch.testing.assert_close(norm(v[i]), norm(v_c[i]), rtol=1e-6, atol=0)
        with pytest.raises(ValueError, match="cfg_normalization=-1.0; expected 0"):
            ZImageAdapter(flow.pipe, height=SIZE, width=SIZE, finetune="none",
                          cfg_normalization=-1.0)


# ---------------------------------------------------------- Z-Image specifics beyond conformance
def test_each_prompt_keeps_its_own_token_states_whatever_its_batch(tiny_z_image_dir):
    flow = ZImageAdapter.from_pretrained(tiny_z_image_dir, height=SIZE, width=SIZE,
                                         finetune="none", guidance_scale=0.0,
                                         max_sequence_length=48)
    long = "a red cat on a mat"
    cond = flow.encode_prompt([PROMPTS[0], long, PROMPTS[0]])
    lengths = flow.prompt_lengths([PROMPTS[0], long])
    assert cond["mask"].sum(1).tolist() == [lengths[0], lengths[1], lengths[0]]
    assert len(flow._cache) == 2  # each distinct text encoded once
    alone, _ = flow.pipe.encode_prompt([long], do_classifier_free_guidance=False,
                                       max_sequence_length=48)
    torch.testing.assert_close(cond["emb"][1][cond["mask"][1]], alone[0], rtol=0, atol=1e-6)
    assert not cond["emb"][0][~cond["mask"][0]].any()  # zero padding past its tokens


def test_prompt_lengths_count_the_chat_template_and_limits_warn_or_fail(tiny_z_image_dir):
    pipe = load_pipeline("ZImagePipeline", tiny_z_image_dir)
    flow = ZImageAdapter(pipe, height=SIZE, width=SIZE, finetune="none", max_sequence_length=40)
    short, long = "a cat", "a cat " * 5
    counts = flow.prompt_lengths([short, long])
    # the byte-level tokenizer: one token per byte; the template adds <|im_start|>user\n and
    # <|im_end|>\n<|im_start|>assistant\n = 6 + 13 tokens around the text
    assert counts == [len(short) + 19, len(long) + 19]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow.check_prompts([short])
    with pytest.warns(UserWarning, match=rf"1 of 2 prompts .*max_sequence_length=40 .*"
                                         rf"#1 \({counts[1]} tokens\).*Raise .* to {counts[1]}"):
        flow.check_prompts([short, long])
    pipe.tokenizer.model_max_length = 45
    with pytest.raises(ValueError, match=rf"1 of 2 prompts are longer than the 45 tokens "
                                         rf"ZImage's text encoder reads: #1 \({counts[1]} tokens"):
        flow.check_prompts([short, long])
    with pytest.raises(ValueError, match="max_sequence_length=64 but ZImage's text encoder "
                                         "reads at most 45 tokens"):
        ZImageAdapter(pipe, height=SIZE, width=SIZE, finetune="none", max_sequence_length=64)


def test_z_image_resolution_shift_loading_errors_lora_and_fsdp_blocks(tiny_z_image_dir):
    pipe = load_pipeline("ZImagePipeline", tiny_z_image_dir)
    with pytest.raises(ValueError, match=r"9x8 is not a positive multiple of 2 .*patchifies "
                                         r"2x2.*use 8x8"):
        ZImageAdapter(pipe, height=9, width=8, finetune="none")
    assert not getattr(pipe.transformer, "peft_config", None)  # refused before any LoRA
    flow = ZImageAdapter(pipe, height=SIZE, width=SIZE, finetune="none")
    assert flow.latent_shape(16, 24) == (4, 16, 24)  # a fixed shift: any even resolution
    with pytest.raises(ValueError, match="frames=3; Z-Image makes images"):
        flow.latent_shape(frames=3)
    pipe.scheduler.register_to_config(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="shifts its schedule by the resolution"):
        ZImageAdapter(pipe, height=SIZE, width=SIZE, finetune="none", shift=3.0)
    with pytest.raises(ValueError, match="built for 8x8 .* height=16, width=16"):
        ZImageAdapter(pipe, height=SIZE, width=SIZE, finetune="none").latent_shape(16, 16)
    with pytest.raises(FileNotFoundError, match=r"ZImagePipeline.*Expected folder layout: .*"
                                                r"transformer/ \(ZImageTransformer2DModel\)"):
        ZImageAdapter.from_pretrained("org/missing-z-image")
    with pytest.raises(ValueError, match="size=7; .* must be even"):
        ZImageAdapter.build_tiny_pipeline(7, 0)
    pipe.scheduler.register_to_config(use_dynamic_shifting=False)
    lora = ZImageAdapter(pipe, height=SIZE, width=SIZE, lora_rank=2, lora_alpha=2)
    assert [type(b).__name__ for b in lora.fsdp_blocks()] == ["ZImageTransformerBlock"] * 3
    trained = {n.split(".")[0] for n, p in lora.transformer.named_parameters() if p.requires_grad}
    assert trained == {"noise_refiner", "context_refiner", "layers"}  # LoRA in every block
