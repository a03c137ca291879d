"""Qwen-Image (QwenImagePipeline) passes the flow adapter conformance tests with true CFG on:
packed latents, the resolution-shifted schedule with its terminal stretch, a Qwen2.5-VL text
encoder read through a chat template; and what is Qwen-Image's own."""
from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conformance import PROMPTS, load  # noqa: E402

from mmrl.diffusion import sample_sde  # noqa: E402
from mmrl.diffusion.models.qwen_image import (QwenImageAdapter,  # noqa: E402
                                              build_tiny_qwen_image)

conformance = load()
SIZE, CFG, NEG = 16, 4.0, " "


def true_cfg(v_cond, v_neg, scale):
    """QwenImagePipeline.__call__'s combine, written out: the CFG mix rescaled per token to the
    conditional prediction's norm."""
    comb = v_neg + scale * (v_cond - v_neg)
    return comb * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1,
                                                                          keepdim=True))


class TestQwenImageAdapter(conformance.FlowAdapterConformance):
    FAMILY = "qwen_image"
    SIZE = SIZE
    KWARGS = {"guidance_scale": CFG, "max_sequence_length": 32}

    @pytest.fixture(scope="class")
    def tiny_dir(self, tiny_qwen_dir):
        """The module's tiny Qwen-Image (16x16, built by QwenImageAdapter.build_tiny)."""
        return tiny_qwen_dir

    def library_velocity(self, transformer, adapter, latents, sigma, cond):
        # QwenImagePipeline.__call__: timestep t/1000 with t = 1000·σ, guidance None, img_shapes
        # (1, h/2, w/2), the pipeline's own prompt embeddings (mask None: the two prompts have one
        # length), a second forward on the negative prompt, the norm-rescaled true CFG
        pipe = adapter.pipe
        emb, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=32)
        neg, neg_mask = pipe.encode_prompt([NEG] * len(PROMPTS), max_sequence_length=32)
        f = pipe.vae_scale_factor
        shapes = [[(1, SIZE // f // 2, SIZE // f // 2)]] * latents.shape[0]

        def forward(e, m):
            return transformer(hidden_states=latents, timestep=(sigma * 1000) / 1000,
                               guidance=None, encoder_hidden_states_mask=m,
                               encoder_hidden_states=e, img_shapes=shapes, return_dict=False)[0]
        return true_cfg(forward(emb, mask), forward(neg, neg_mask), CFG)

    def pipeline_latents(self, pipe, generator):
        return pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, SIZE, SIZE,
                                    torch.float32, "cpu", generator)

    def pipeline_images(self, pipe, noise, steps=None, **kw):
        with torch.no_grad():
            return pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=steps or self.STEPS,
                        latents=noise.clone(), output_type="pt", max_sequence_length=32,
                        **kw).images

    def test_latents_and_ode_sampling_equal_the_pipelines_own(self, frozen):
        # Overrides the inherited test: Qwen-Image's CFG is `true_cfg_scale` with a negative
        # prompt (its `guidance_scale` is the guidance-distilled embedding, absent here).
        latents = self.pipeline_latents(frozen.pipe, torch.Generator().manual_seed(0))
        assert tuple(latents.shape) == (1, *frozen.latent_shape(SIZE, SIZE)) == (1, 16, 16)
        noise = torch.randn(2, *latents.shape[1:], generator=torch.Generator().manual_seed(0))
        sigmas = frozen.sigmas(self.STEPS)
        traj = sample_sde(frozen, noise, sigmas, frozen.encode_prompt(PROMPTS), sde_steps=[])
        expected = self.pipeline_images(frozen.pipe, noise, negative_prompt=[NEG] * 2,
                                        true_cfg_scale=CFG)
        torch.testing.assert_close(frozen.decode(traj.final), expected, rtol=0, atol=1e-5)
        with frozen.unguided():  # guidance 1: one conditional forward, the pipeline without CFG
            traj = sample_sde(frozen, noise, sigmas, frozen.encode_prompt(PROMPTS), sde_steps=[])
        torch.testing.assert_close(frozen.decode(traj.final),
                                   self.pipeline_images(frozen.pipe, noise), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="frames=None"):
            frozen.latent_shape(SIZE, SIZE, frames=4)

    def test_gradients_are_invariant_to_t_chunks_and_micro_batches(self, adapter_cls, tiny_dir):
        # Overrides the inherited test to run it at guidance 1 (one forward per row). With true
        # CFG on, v = (4·v_c − 3·v_u)·‖v_c‖/‖·‖ amplifies the fp32 rounding of batch-size-dependent
        # kernels ~5x: measured 5.7e-9 max abs difference on gradients of max 2.6e-3, over the
        # inherited atol 1e-9 (1.0e-9 at guidance 1). Row independence under CFG is checked by
        # test_true_cfg_rescales_the_mix_to_the_conditional_norm_and_rows_keep_their_length.
        self.KWARGS = {**type(self).KWARGS, "guidance_scale": 1.0}  # this test's instance only
        super().test_gradients_are_invariant_to_t_chunks_and_micro_batches(adapter_cls, tiny_dir)

    def test_schedule_is_the_pipelines_set_timesteps_at_this_resolution(self, frozen):
        with torch.no_grad():
            frozen.pipe(PROMPTS[:1], height=SIZE, width=SIZE, num_inference_steps=5,
                        output_type="latent", max_sequence_length=32)
        sigmas = frozen.sigmas(5)
        assert torch.equal(sigmas, frozen.pipe.scheduler.sigmas.float())  # the call's schedule
        # μ = 0.5 + (16 - 256)·0.4/7936 for 16 image tokens, exponential shift, terminal 0.02
        mu = 0.5 + (16 - 256) * (0.9 - 0.5) / (8192 - 256)
        s = torch.linspace(1.0, 0.2, 5, dtype=torch.float64)
        shifted = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.02))
        torch.testing.assert_close(sigmas[:-1].double(), stretched, rtol=0, atol=1e-6)
        assert float(sigmas[-2]) == pytest.approx(0.02) and float(sigmas[-1]) == 0.0

    def test_the_adapter_is_built_for_one_resolution(self, frozen):
        with pytest.raises(ValueError, match="built for 16x16 .* height=32, width=32"):
            frozen.latent_shape(32, 32)
        with pytest.raises(ValueError, match=r"18x16 is not a positive multiple of 4 .*use "
                                             r"16x16"):
            QwenImageAdapter(frozen.pipe, height=18, width=16, finetune="none")
        with pytest.raises(ValueError, match="shifts its schedule by the resolution"):
            QwenImageAdapter(frozen.pipe, height=16, width=16, finetune="none", shift=3.0)
        with pytest.raises(ValueError, match="multiple of 4 \\(e.g. 12\\)"):
            build_tiny_qwen_image(10)

    def test_prompt_lengths_count_the_template_minus_its_dropped_prefix(self, frozen):
        pipe = frozen.pipe
        drop = pipe.prompt_template_encode_start_idx
        prefix = pipe.prompt_template_encode.split("{}")[0]
        assert drop == 34 and len(pipe.tokenizer(prefix).input_ids) == 34  # as Qwen's tokenizer
        prompts = ["a red cat", "the image of a blue dog", NEG]
        lengths = frozen.prompt_lengths(prompts)
        # byte-level prompt tokens (" image", " of" are whole words, "the" after "\n" is not) +
        # the template's end <|im_end|> \n <|im_start|> assistant \n
        assert lengths == [9 + 5, 3 + 1 + 1 + 2 + 5 + 4 + 5, 1 + 5]
        for prompt, n in zip(prompts, lengths):  # what the transformer reads, uncut
            assert pipe.encode_prompt([prompt], max_sequence_length=1024)[0].shape[1] == n
        cut = QwenImageAdapter(pipe, height=SIZE, width=SIZE, finetune="none",
                               max_sequence_length=10)
        with pytest.warns(UserWarning, match=r"2 of 3 prompts .*max_sequence_length=10 .*#0 "
                                             r"\(14 tokens\).*Raise .* to 21 \(the encoder reads "
                                             r"at most 1024\)"):
            cut.check_prompts(prompts)
        assert cut.encode_prompt(prompts)["emb"].shape[1] == 10  # cut there, as the pipeline
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            frozen.check_prompts(prompts)
        with pytest.raises(ValueError, match="1 of 1 prompts are longer than the 1024 tokens "
                                             "QwenImage's text encoder reads: #0 \\(1033 tokens"):
            frozen.check_prompts(["x" * 1028])
        with pytest.raises(ValueError, match="max_sequence_length=2048 but QwenImage's text "
                                             "encoder reads at most 1024 tokens"):
            QwenImageAdapter(pipe, height=SIZE, width=SIZE, finetune="none",
                             max_sequence_length=2048)


# ---------------------------------------------------------------- Qwen-Image beyond conformance
def test_true_cfg_rescales_the_mix_to_the_conditional_norm_and_rows_keep_their_length(
        tiny_qwen_dir):
    flow = QwenImageAdapter.from_pretrained(tiny_qwen_dir, height=SIZE, width=SIZE,
                                            finetune="none", max_sequence_length=32)
    prompts = ["a red cat", "the image of a blue dog"]  # 14 and 21 tokens: padded and masked
    cond = flow.encode_prompt(prompts)
    assert cond["mask"].sum(1).tolist() == [14, 21] and cond["neg_mask"].shape == (2, 6)
    x = torch.randn(2, *flow.latent_shape(), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        guided = flow.velocity(x, sigma, cond)
        with flow.unguided():
            v_cond = flow.velocity(x, sigma, cond)
        rows = [flow.velocity(x[i:i + 1], sigma[i:i + 1], {k: v[i:i + 1] for k, v in cond.items()})
                for i in range(2)]
    # the guided velocity keeps the conditional prediction's per-token norm
    torch.testing.assert_close(guided.norm(dim=-1), v_cond.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert (guided - v_cond).abs().max() > 1e-3
    # a row alone (its padding trimmed, mask None) equals the row in the padded, masked batch
    torch.testing.assert_close(torch.cat(rows), guided, rtol=0, atol=1e-5)
    with torch.no_grad(), flow.unguided():
        v_neg = flow.velocity(x, sigma, {"emb": cond["neg_emb"], "mask": cond["neg_mask"]})
    torch.testing.assert_close(guided, true_cfg(v_cond, v_neg, CFG), rtol=1e-5, atol=1e-6)


def test_encode_images_is_the_pipelines_packing_of_the_normalized_vae_mean(tiny_qwen_dir):
    flow = QwenImageAdapter.from_pretrained(tiny_qwen_dir, height=SIZE, width=SIZE,
                                            finetune="none")
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    packed = flow.encode_images(images)
    assert packed.shape == (2, *flow.latent_shape())
    vae, cfg = flow.pipe.vae, flow.pipe.vae.config
    with torch.no_grad():
        z = vae.encode(images[:, :, None] * 2 - 1).latent_dist.mode()  # [B, C, 1, h, w]
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    unpacked = flow.pipe._unpack_latents(packed, SIZE, SIZE, flow.pipe.vae_scale_factor)
    torch.testing.assert_close(unpacked, (z - mean) / std, rtol=1e-5, atol=1e-6)


def test_missing_weights_name_the_pipeline_and_the_fix():
    with pytest.raises(FileNotFoundError, match="QwenImagePipeline.*huggingface-cli download.*"
                                                "Expected folder layout: model_index.json .*"
                                                "text_encoder/ \\(Qwen2_5_VL"):
        QwenImageAdapter.from_pretrained("org/missing-qwen-image")


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    return str(QwenImageAdapter.build_tiny(tmp_path_factory.mktemp("tiny_qwen_image"),
                                           size=SIZE))
