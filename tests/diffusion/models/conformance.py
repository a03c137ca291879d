"""The tests every flow adapter passes (as every diffusers scheduler's test inherits
``SchedulerCommonTest``). A family's test file subclasses :class:`FlowAdapterConformance`, sets
``FAMILY``, ``SIZE`` and ``KWARGS`` and writes the two hooks that state the library's own
conventions: :meth:`library_velocity` (the transformer forward as the diffusers pipeline calls
it) and :meth:`pipeline_latents` (the pipeline's own initial latents, packing included). A video
family sets ``FRAMES`` (frames per sample): the latents, the pipeline call (``num_frames``, its
``.frames`` output) and the job (``diffusion.frames``) then make videos.

Two gloo ranks equal one process: tests/train/test_distributed.py runs the diffusion job on the
SD3 demo pipeline that way (a family-independent path: the loop shards rows, not latents).

Load this module with :func:`load` (a unique module name, so the VLM suite's conformance module
never shadows it).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

PROMPTS = ["a red cat", "a blue dog"]


def load():
    """This module, imported once under a unique name."""
    name = "mmrl_tests_flow_conformance"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class FlowAdapterConformance:
    """Subclass with ``FAMILY`` (a name of ``mmrl.diffusion.models.FAMILIES``), ``SIZE`` (image
    side of the tiny pipeline) and ``KWARGS`` (adapter arguments: guidance, prompt length)."""

    FAMILY = ""
    SIZE = 16
    KWARGS: dict = {}
    STEPS = 4
    GRAD_ATOL = 0.0
    """Gradient chunk-invariance tolerance, relative to the largest gradient (the absolute floor
    is 1e-9): a family whose kernels round differently at another batch size states its own."""
    FRAMES = None
    """Frames per sample of a video family (None: an image family)."""
    REWARD = "brightness"
    """The 3-step job's reward (a video family may need a frame-wise lift)."""

    # ------------------------------------------------------------------ the family's hooks
    def library_velocity(self, transformer, adapter, latents, sigma, cond):
        """``transformer``'s output as the diffusers pipeline calls it (no guidance combine)."""
        raise NotImplementedError

    def pipeline_latents(self, pipe, generator):
        """The pipeline's own initial latents ``[1, ...]`` for one SIZE x SIZE image (video:
        FRAMES frames)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture(scope="class")
    def adapter_cls(self):
        from mmrl.diffusion.models import adapter_class
        return adapter_class(self.FAMILY)

    @pytest.fixture(scope="class")
    def tiny_dir(self, adapter_cls, tmp_path_factory):
        return str(adapter_cls.build_tiny(tmp_path_factory.mktemp(f"tiny_{self.FAMILY}"),
                                          size=self.SIZE))

    def make(self, adapter_cls, tiny_dir, finetune="lora", **kw):
        torch.manual_seed(0)  # the LoRA A init draws from the global RNG
        return adapter_cls.from_pretrained(tiny_dir, height=self.SIZE, width=self.SIZE,
                                           finetune=finetune, lora_rank=4, lora_alpha=8,
                                           frames=self.FRAMES, **{**self.KWARGS, **kw})

    @pytest.fixture(scope="class")
    def frozen(self, adapter_cls, tiny_dir):
        """finetune=none: the base weights, shared by the tests that change no weight."""
        return self.make(adapter_cls, tiny_dir, finetune="none")

    def inputs(self, adapter):
        g = torch.Generator().manual_seed(3)
        x = torch.randn((2, *adapter.latent_shape(self.SIZE, self.SIZE, self.FRAMES)),
                        generator=g)
        return x, torch.tensor([0.8, 0.3]), adapter.encode_prompt(PROMPTS)

    def policy(self, adapter, tiny_dir, **section):
        from mmrl.diffusion.config import DiffusionConfig
        from mmrl.diffusion.policy import DiffusionGroupPolicy
        c = DiffusionConfig(model=tiny_dir, height=self.SIZE, width=self.SIZE,
                            num_steps=self.STEPS, eval_num_steps=self.STEPS,
                            frames=self.FRAMES or 0, **section)
        return DiffusionGroupPolicy(adapter, c)

    @staticmethod
    def move_lora(adapter, seed=1):
        """LoRA B off zero, so the policy differs from the reference."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in adapter.transformer.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))

    # ------------------------------------------------------------------ the tests
    def test_the_registry_picks_this_adapter_by_pipeline_class(self, adapter_cls, tiny_dir,
                                                               frozen):
        from mmrl.diffusion.models import adapter_for_pipeline, pipeline_class_of, resolve_family
        assert pipeline_class_of(tiny_dir) == adapter_cls.PIPELINE_CLASS
        assert resolve_family("auto", tiny_dir) == self.FAMILY
        assert adapter_for_pipeline(frozen.pipe) is adapter_cls

    def test_velocity_equals_the_library_forward(self, adapter_cls, tiny_dir, frozen):
        x, sigma, cond = self.inputs(frozen)
        with torch.no_grad():
            expected = self.library_velocity(frozen.transformer, frozen, x, sigma, cond)
            torch.testing.assert_close(frozen.velocity(x, sigma, cond), expected, rtol=0,
                                       atol=1e-6)
        lora = self.make(adapter_cls, tiny_dir)
        self.move_lora(lora)  # reference = the base weights, the policy is not
        with torch.no_grad():
            assert (lora.velocity(x, sigma, cond) - expected).abs().max() > 1e-3
        torch.testing.assert_close(lora.reference(x, sigma, cond), expected, rtol=0, atol=1e-6)

    def test_latents_and_ode_sampling_equal_the_pipelines_own(self, frozen):
        from mmrl.diffusion import sample_sde
        latents = self.pipeline_latents(frozen.pipe, torch.Generator().manual_seed(0))
        assert tuple(latents.shape) == (1, *frozen.latent_shape(self.SIZE, self.SIZE,
                                                                 self.FRAMES))
        noise = torch.randn(2, *latents.shape[1:], generator=torch.Generator().manual_seed(0))
        traj = sample_sde(frozen, noise, frozen.sigmas(self.STEPS), frozen.encode_prompt(PROMPTS),
                          sde_steps=[])
        video = {} if self.FRAMES is None else {"num_frames": self.FRAMES}
        with torch.no_grad():
            out = frozen.pipe(list(PROMPTS), height=self.SIZE, width=self.SIZE,
                              num_inference_steps=self.STEPS,
                              guidance_scale=self.KWARGS["guidance_scale"],
                              latents=noise.clone(), output_type="pt",
                              max_sequence_length=self.KWARGS["max_sequence_length"], **video)
        expected = out.images if self.FRAMES is None else out.frames  # [B, (F,) 3, H, W]
        torch.testing.assert_close(frozen.decode(traj.final), expected, rtol=0, atol=1e-5)
        if self.FRAMES is None:
            with pytest.raises(ValueError, match="frames=None"):
                frozen.latent_shape(self.SIZE, self.SIZE, frames=4)
        else:
            with pytest.raises(ValueError, match=f"frames={self.FRAMES + 1}"):
                frozen.latent_shape(self.SIZE, self.SIZE, frames=self.FRAMES + 1)

    def test_rollout_logp_equals_the_recomputed_logp_ratio_exactly_one(self, adapter_cls,
                                                                        tiny_dir):
        adapter = self.make(adapter_cls, tiny_dir)
        self.move_lora(adapter)
        policy = self.policy(adapter, tiny_dir)
        with torch.no_grad():
            rollout = policy.rollout(PROMPTS, [{}, {}], 2, torch.Generator().manual_seed(0))
        traj, index, mask = rollout.data["trajectory"].traj, rollout.data["index"], rollout.mask
        sampled = rollout.rollout_logp  # what the policy reports for algo.rollout_is
        assert torch.equal(sampled, torch.where(mask, traj.logp[index], torch.zeros(())))
        rows = torch.arange(len(rollout))
        for t in range(mask.shape[1]):  # one step's rows per call, as when sampling
            logp = policy.logp(rollout, rows, t, t + 1)
            assert torch.equal(logp.detach(), sampled[:, t:t + 1]), t
            assert torch.equal(torch.exp(logp - sampled[:, t:t + 1]).detach(),
                               torch.ones(len(rows), 1))
        assert logp.requires_grad

    def test_gradients_are_invariant_to_t_chunks_and_micro_batches(self, adapter_cls, tiny_dir):
        from mmrl.algo.losses import PolicyLoss
        from mmrl.train.loop import LoopSettings, update
        adapter = self.make(adapter_cls, tiny_dir)
        self.move_lora(adapter)
        policy = self.policy(adapter, tiny_dir)
        with torch.no_grad():
            rollout = policy.rollout(PROMPTS, [{}, {}], 2, torch.Generator().manual_seed(0))
        adv = torch.linspace(-1.5, 1.3, len(rollout))
        loss_fn = PolicyLoss("grpo", beta=0.05)  # the closed-form KL to the reference too

        def grads(**settings):
            params = [p for p in policy.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=0.0)  # keeps the weights and leaves .grad
            update(policy, opt, loss_fn, rollout, adv,
                   LoopSettings(group_size=2, max_grad_norm=0.0, **settings),
                   torch.Generator().manual_seed(0))
            return torch.cat([p.grad.flatten() for p in params])

        whole = grads()
        scale = float(whole.abs().max())
        assert scale > 0
        torch.testing.assert_close(grads(t_chunk=1, micro_batch_size=3), whole, rtol=1e-4,
                                   atol=max(1e-9, self.GRAD_ATOL * scale))

    def test_export_round_trips_through_diffusers_from_pretrained(self, adapter_cls, tiny_dir,
                                                                  tmp_path):
        import diffusers

        from mmrl.diffusion.models.base import _absent_components
        adapter = self.make(adapter_cls, tiny_dir)
        self.move_lora(adapter)
        x, sigma, cond = self.inputs(adapter)
        with torch.no_grad():
            live = adapter.velocity(x, sigma, cond)
        pipeline = getattr(diffusers, adapter_cls.PIPELINE_CLASS)
        absent = _absent_components(tiny_dir)  # components the tiny pipeline saved as None
        adapter.export(str(tmp_path / "lora"))
        pipe = pipeline.from_pretrained(tiny_dir, **absent)
        pipe.load_lora_weights(str(tmp_path / "lora"))
        adapter.export(str(tmp_path / "merged"), merge_lora=True)
        merged = pipeline.from_pretrained(str(tmp_path / "merged"), **absent)
        for loaded in (pipe, merged):
            wrapped = adapter_cls(loaded, height=self.SIZE, width=self.SIZE, finetune="none",
                                  frames=self.FRAMES, **self.KWARGS)
            with torch.no_grad():
                torch.testing.assert_close(wrapped.velocity(x, sigma, cond), live, rtol=0,
                                           atol=1e-5)

    def test_a_three_step_job_changes_the_weights(self, adapter_cls, tiny_dir, tmp_path):
        from mmrl.config.schema import config_from_dict
        from mmrl.diffusion.job import run
        out = tmp_path / "run"
        cfg = config_from_dict({
            "job": "diffusion", "algo": {"preset": "grpo"},
            "train": {"steps": 3, "prompts_per_step": 2, "group_size": 2, "lr": 1e-2,
                      "seed": 0, "device": "cpu", "progress": False, "output_dir": str(out),
                      "resume": "never", "log_every": 100, "export": False},
            "diffusion": {"model": tiny_dir, "pipeline": "auto", "dtype": "float32",
                          "lora_rank": 4, "lora_alpha": 8, "height": self.SIZE,
                          "width": self.SIZE, "resolution_multiple": 1, "num_steps": 3,
                          "eval_num_steps": 3, "reward": self.REWARD, "prompts": PROMPTS,
                          **({} if self.FRAMES is None else {"frames": self.FRAMES}),
                          **self.KWARGS}})
        summary = run(cfg)
        names = set(self.make(adapter_cls, tiny_dir).trainable_state_dict())
        final = {k: v for k, v in torch.load(out / "final.pt").items() if k in names}
        assert final.keys() == names and len(names) > 0
        # peft's gaussian init starts every LoRA B at 0: training moved them (a projection whose
        # output the last block drops, e.g. SD3's final to_add_out, gets no gradient)
        moved = [k for k, v in final.items() if "lora_B" in k and float(v.abs().max()) > 0]
        assert len(moved) > len([k for k in final if "lora_B" in k]) // 2, moved
        assert summary["steps"] == 3
        assert all(math.isfinite(h["loss"]) for h in summary["history"])
