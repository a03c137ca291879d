"""The conformance tests every VLM family adapter passes (:class:`VLMAdapterConformance`), the
way every diffusers scheduler's tests inherit ``SchedulerCommonTest``.

A family's test file subclasses it once per architecture and sets::

    class TestMyFamily(VLMAdapterConformance):
        adapter = MyAdapter()            # the adapter under test
        model_type = "my_model_type"     # what its tiny model's config.json says
        build_kwargs = {}                # extra keywords for adapter.build_tiny

and, where the family needs them, overrides ``library_kwargs`` (extra inputs the library's own
forward needs, e.g. Qwen's ``mm_token_type_ids``) and ``library_video_options`` (video options
under which the library's own positions are right). The tiny model is built with
``adapter.build_tiny`` into a class-scoped temp folder and loaded BY PATH (``load_vlm``), as a
user's checkpoint is.

Inherited tests: the registry picks the adapter and refuses other types with the list; the family
package imports without torch; rollout log-probs equal the recomputed ``logp`` (and the ratio is
exactly 1 at step 0) for video, image and text prompts; our logits equal the library's own
forward (``model(input_ids, <vision tensors>)``) for a video, an image and a text prompt;
``logp`` and TW weights are invariant to time chunks and row micro-batches; ``pair_scores``
equals ``logp`` on the same rows; the export
round-trips through the library's own ``from_pretrained`` to the same logits (full, and LoRA
merged); a 3-step video job changes the language model's weights. Two gloo ranks equal one
process: not here (a torchrun per family is tens of seconds); tests/train/test_distributed.py
runs the video job on 2 ranks (DDP and FSDP) with the default tiny model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
VIDEO = dict(mode="uniform", fps=4.0, max_frames=4)


class VLMAdapterConformance:
    """Inherit, set ``adapter``, ``model_type`` (and maybe ``build_kwargs``); see the module."""

    adapter = None
    model_type: str = ""
    build_kwargs: dict = {}
    video_options: dict = VIDEO
    library_video_options: dict = VIDEO

    # ------------------------------------------------------------------ hooks
    def library_kwargs(self, ids: torch.Tensor, config) -> dict:
        """Extra keyword arguments of the library's own forward for ``ids [b, L]``."""
        return {}

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture(scope="class")
    def model_dir(self, tmp_path_factory):
        folder = str(tmp_path_factory.mktemp(f"tiny_{self.model_type}") / "model")
        return self.adapter.build_tiny(folder, model_type=self.model_type, **self.build_kwargs)

    @pytest.fixture(scope="class")
    def task(self, tmp_path_factory):
        """(jsonl path, [video conversation, image conversation, text conversation])."""
        from PIL import Image

        from mmrl.video.data import build_messages, load_vl_dataset
        from mmrl.video.synthetic_task import write_synthetic_task
        jsonl = write_synthetic_task(str(tmp_path_factory.mktemp("task")), 4, seed=0)
        record = list(load_vl_dataset(jsonl))[0]
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3),
                                                               dtype=np.uint8))
        image = [{"role": "user", "content": [{"type": "image", "image": img},
                                              {"type": "text", "text": "What is it?"}]}]
        text = [{"role": "user", "content": [{"type": "text", "text": "Say A."}]}]
        return jsonl, [build_messages(record, "plain"), image, text]

    def policy(self, model_dir, finetune="full", video=None, **kw):
        from mmrl.video.policy import VLMPolicy, load_vlm
        torch.manual_seed(0)
        model, proc = load_vlm(model_dir, finetune=finetune, lora_rank=4, lora_alpha=8,
                               adapter=self.adapter)
        return VLMPolicy(model, proc, video=video or self.video_options, adapter=self.adapter,
                         **{"max_new_tokens": 4, **kw})

    @staticmethod
    def rollout(policy, conversations, group=2, seed=0):
        meta = [{"messages": m} for m in conversations]
        with torch.no_grad():
            return policy.rollout([f"p{i}" for i in range(len(meta))], meta, group,
                                  torch.Generator().manual_seed(seed))

    # ------------------------------------------------------------------ tests
    def test_registry_picks_this_adapter_and_lists_the_supported_types(self, model_dir):
        from mmrl.video.models import adapter_for, adapter_for_path, supported_model_types
        with open(os.path.join(model_dir, "config.json")) as f:
            assert json.load(f)["model_type"] == self.model_type
        assert type(adapter_for(self.model_type)) is type(self.adapter)
        assert type(adapter_for_path(model_dir)) is type(self.adapter)
        assert self.model_type in self.adapter.model_types
        assert set(self.adapter.model_types) <= set(supported_model_types())
        with pytest.raises(NotImplementedError, match=f"'no_such_vlm'.*{self.model_type}"):
            adapter_for("no_such_vlm")

    def test_the_registry_and_family_package_import_without_torch(self):
        family = type(self.adapter).__module__.rsplit(".", 1)[0]
        code = (f"import sys, mmrl.video.config, mmrl.video.models, {family}; "
                f"print(sorted(m for m in ('torch', 'numpy', 'transformers') "
                f"if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out == "[]"

    def test_rollout_logp_equals_recomputed_logp_and_the_ratio_is_one(self, model_dir, task):
        from mmrl.algo.losses import PolicyLoss
        from mmrl.train.loop import LoopSettings, learn
        from mmrl.train.reward_fn import RewardBatch
        pol = self.policy(model_dir)
        ro = self.rollout(pol, task[1])
        assert len(ro) == 6 and len(ro.data["prompt_cache"].vision) == 3  # one copy per prompt
        with torch.no_grad():
            lp = pol.logp(ro, torch.arange(6), 0, ro.mask.shape[1])
        assert ro.mask.sum(1).min() >= 1 and bool(torch.isfinite(lp[ro.mask]).all())
        assert float((lp - ro.rollout_logp).abs()[ro.mask].max()) < 1e-5
        rewards = RewardBatch(torch.tensor([[1.0], [0.0], [0.5], [0.0], [1.0], [1.0]]), ["acc"],
                              torch.ones(6, dtype=torch.bool))
        opt = torch.optim.SGD([p for p in pol.parameters() if p.requires_grad], lr=0.0)
        m = learn(pol, opt, PolicyLoss("grpo"), ro, rewards, LoopSettings(group_size=2),
                  torch.Generator())
        assert m["ratio_min"] == 1.0 and m["ratio_max"] == 1.0

    def test_logits_equal_the_library_forward(self, model_dir, task):
        """Prompt + completion through the policy (vision once, the adapter's positions, extra
        LM inputs expanded) equals the library's ``model(input_ids, <vision tensors>)`` with the
        vision tensors copied per row."""
        pol = self.policy(model_dir, video=self.library_video_options, max_new_tokens=3)
        for conv in task[1]:  # video, image, text
            ro = self.rollout(pol, [conv], group=2, seed=3)
            cache, resp = ro.data["prompt_cache"], ro.data["response"]
            with torch.no_grad():
                hidden, head = pol._hidden(pol.model, cache, ro.data["prompt_index"], resp)
                ours = head(hidden)
                ids = torch.cat([cache.ids[[0, 0]], resp], 1)
                v = cache.vision[0]
                vision = {k: torch.cat([v[k]] * 2) for k in v}
                lib = pol.model(input_ids=ids, attention_mask=torch.ones_like(ids), **vision,
                                **self.library_kwargs(ids, pol.cfg)).logits
            assert ours.shape == lib.shape == (2, cache.ids.shape[1] + resp.shape[1],
                                               head.out_features)
            torch.testing.assert_close(ours, lib, atol=1e-5, rtol=1e-5)

    def test_logp_and_token_weights_are_invariant_to_chunks_and_micro_batches(self, model_dir,
                                                                                task):
        pol = self.policy(model_dir, max_new_tokens=5)
        ro = self.rollout(pol, task[1][:2], group=3, seed=1)
        T = ro.mask.shape[1]
        with torch.no_grad():
            whole = pol.logp(ro, torch.arange(6), 0, T)
            chunks = torch.cat([pol.logp(ro, torch.arange(6), t, min(t + 2, T))
                                for t in range(0, T, 2)], 1)
            rows = torch.cat([pol.logp(ro, torch.tensor(r), 0, T) for r in ([4, 0], [1, 5, 2],
                                                                          [3])])
        torch.testing.assert_close(chunks, whole, atol=1e-5, rtol=0)
        torch.testing.assert_close(rows, whole[[4, 0, 1, 5, 2, 3]], atol=1e-5, rtol=0)
        pol.tw_chunk = 1
        one = pol.token_weights(ro)
        pol.tw_chunk = 64
        torch.testing.assert_close(pol.token_weights(ro), one, atol=1e-5, rtol=0)
        assert float(one.max()) > 1.0 and bool((one[~ro.mask] == 1.0).all())

    def test_pair_scores_equal_logp_for_video_image_and_text_prompts(self, model_dir, task):
        """``pair_scores`` (one forward for both completions of a pair, the lm head in
        chunks) equals ``logp`` on the same rows; a pair record's completions end with the
        adapter's end-of-turn token, one of its end tokens."""
        pol = self.policy(model_dir, tw_chunk=2)
        assert pol.adapter.turn_end_id(pol.tok) in pol.eos
        ro = self.rollout(pol, task[1], group=2, seed=2)  # rows (0, 1) video, (2, 3) image, ...
        scores = pol.pair_scores(ro, torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5]), None,
                                 with_ref=False)
        T = scores.chosen_logp.shape[1]
        with torch.no_grad():
            lp = pol.logp(ro, torch.arange(6), 0, ro.mask.shape[1])
        for got, m, rows in ((scores.chosen_logp, scores.chosen_mask, [0, 2, 4]),
                             (scores.rejected_logp, scores.rejected_mask, [1, 3, 5])):
            assert torch.equal(m, ro.mask[rows, :T])
            torch.testing.assert_close(got[m], lp[rows, :T][m], atol=1e-5, rtol=0)
        # a pair record of the job's data: its completions end with the end-of-turn token
        from mmrl.video.data import load_vl_dataset
        record = list(load_vl_dataset(task[0]))[0]
        pairs, chosen, rejected = pol.pair_rollout([{**record.to_json(), "chosen": "A",
                                                     "rejected": "B"}])
        end = pol.adapter.turn_end_id(pol.tok)
        want = [pol.tok(t, add_special_tokens=False)["input_ids"] + [end] for t in "AB"]
        assert pairs.data["response"].tolist() == want and bool(pairs.mask.all())
        s = pol.pair_scores(pairs, chosen, rejected, None, with_ref=False)
        assert bool(torch.isfinite(s.chosen_logp).all() & torch.isfinite(s.rejected_logp).all())

    @pytest.mark.parametrize("finetune", ["full", "lora"])
    def test_shared_prefix_equals_the_repeated_prompt_forward(self, model_dir, task, finetune):
        """``video.shared_prefix`` (each unique prompt runs once, its rows' responses packed
        behind it) against every row repeating its prompt, in float64 (tests/video/float64.py):
        the same samples, and equal values AND gradients of ``logp`` (rows in mixed order, a T
        chunk), ``logp_and_entropy`` and ``pair_scores`` (row subsets), equal
        ``ref_logp`` and TW weights, for video, image and text prompts (groups of 3, so
        left padding and several blocks per prompt). LoRA: ``logp`` and the reference (the
        adapter disabled)."""
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from float64 import exact_float64
        # two frames of video (one temporal grid): the video prompt's tokens halved, still
        # the longest prompt, so the others are left-padded
        pol = self.policy(model_dir, finetune=finetune, max_new_tokens=5,
                          video=dict(self.video_options, max_frames=2))
        assert exact_float64(pol.model) > 0
        pol.enable_reference()
        if pol.ref is not None:
            exact_float64(pol.ref)
        rolls = {}
        for shared in (False, True):
            pol.shared_prefix = shared
            rolls[shared] = self.rollout(pol, task[1], group=3, seed=4)
        ro = rolls[True]
        assert torch.equal(ro.data["response"], rolls[False].data["response"])
        assert torch.equal(ro.mask, rolls[False].mask)
        torch.testing.assert_close(ro.rollout_logp, rolls[False].rollout_logp, atol=1e-12, rtol=0)
        T = ro.mask.shape[1]
        params = [p for p in pol.parameters() if p.requires_grad]
        w = torch.randn(9, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        rows = torch.tensor([7, 0, 4, 5, 8, 1, 3, 6, 2])  # every row, prompts interleaved
        cases = {
            "logp": lambda: pol.logp(ro, rows, 1, T) * w[:, 1:],  # a T chunk
            "logp_and_entropy": lambda: torch.stack(pol.logp_and_entropy(
                ro, torch.tensor([2, 3, 8]), 0, T)) * w[:3],
            "pair_scores": lambda: _pair_total(pol.pair_scores(ro, torch.tensor([0, 3, 6]),
                                                               torch.tensor([1, 5, 7]))),
        }
        if finetune == "lora":  # the same forward with LoRA layers: all rows suffice
            cases = {"logp": cases["logp"]}
        for name, fn in cases.items():
            got = {}
            for shared in (False, True):
                pol.shared_prefix = shared
                for p in params:
                    p.grad = None
                value = fn()
                value.sum().backward()
                got[shared] = (value.detach(), [p.grad.clone() for p in params])
            torch.testing.assert_close(got[True][0], got[False][0], atol=1e-12, rtol=0,
                                       msg=lambda m: f"{name}: {m}")
            for a, b in zip(got[True][1], got[False][1]):
                torch.testing.assert_close(a, b, atol=1e-12 * max(1.0, float(b.abs().max())),
                                           rtol=0, msg=lambda m: f"{name} gradient: {m}")
            assert any(float(g.abs().max()) > 0 for g in got[True][1])
        with torch.no_grad():
            outs = {}
            for shared in (False, True):
                pol.shared_prefix = shared
                outs[shared] = (pol.ref_logp(ro, torch.arange(9), 0, T), pol.token_weights(ro))
        for a, b in zip(outs[True], outs[False]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

    def test_export_round_trips_through_the_library_from_pretrained(self, model_dir, task,
                                                                      tmp_path):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        ids = None
        for finetune, merge in (("full", False), ("lora", True)):
            pol = self.policy(model_dir, finetune=finetune)
            if finetune == "lora":  # a non-zero adapter, so the merge matters
                with torch.no_grad():
                    for n, p in pol.model.named_parameters():
                        if "lora_B" in n:
                            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
            path = pol.export_pretrained(str(tmp_path / finetune), merge_lora=merge)
            loaded = AutoModelForImageTextToText.from_pretrained(path)
            proc = AutoProcessor.from_pretrained(path)
            ro = self.rollout(pol, task[1][:1], group=1)
            cache = ro.data["prompt_cache"]
            ids = torch.cat([cache.ids, ro.data["response"]], 1)
            kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **cache.vision[0],
                      **self.library_kwargs(ids, pol.cfg))
            with torch.no_grad():
                torch.testing.assert_close(loaded(**kw).logits, pol.model(**kw).logits,
                                           atol=1e-5, rtol=1e-5)
            assert proc.tokenizer.decode(ids[0]) == pol.tok.decode(ids[0])
            with open(os.path.join(path, "mmrl_export.json")) as f:
                assert json.load(f)["kind"] == self.adapter.name

    def test_a_three_step_video_job_changes_the_language_model(self, model_dir, task, tmp_path):
        from transformers import AutoModelForImageTextToText

        from mmrl.cli.app import main
        out = tmp_path / "run"
        rc = main(["train", os.path.join(ROOT, "configs/demo/video_tiny.yaml"), "train.steps=3",
                   "train.prompts_per_step=2", "train.group_size=4", "train.log_every=1",
                   "train.progress=false", "train.device=cpu", "train.lr=0.05",
                   "train.export=false", f"video.model={model_dir}", f"video.data={task[0]}",
                   f"train.output_dir={out}"])
        assert rc == 0
        metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert len(metrics) == 3 and all(np.isfinite(m["loss"]) for m in metrics)
        before = AutoModelForImageTextToText.from_pretrained(model_dir).state_dict()
        after = torch.load(out / "final.pt")
        assert set(after) == set(before)
        changed = [k for k in after if not torch.equal(after[k], before[k])]
        assert any(".language_model." in k for k in changed)
        assert all(bool(torch.isfinite(v).all()) for v in after.values())


def _pair_total(scores) -> torch.Tensor:
    """Both sides' log-probs of a :class:`~mmrl.train.preference.PrefScores`, masked, [2, P, T]."""
    return torch.stack([scores.chosen_logp * scores.chosen_mask,
                        scores.rejected_logp * scores.rejected_mask])
