"""The SFT stage (mmrl.train.sft_stage): the loss by hand (value and gradient, against a manual
cross-entropy of logits), the stage's steps first in a run (toy policy), its learning rate put
back for the RL steps, and a run resumed mid-SFT ending with the uninterrupted run's weights."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmrl.config.schema import config_from_dict
from mmrl.demo.toy import ToyPolicy, digit_reward, make_prompts
from mmrl.train.sft_stage import SFTData, SFTStage, sft_loss
from mmrl.train.runner import run_training

TOY = {"digits": 5, "length": 3, "num_prompts": 12, "d_model": 16, "layers": 1, "heads": 2}


def test_sft_loss_by_hand_value_and_gradient():
    # row 0: targets of probability 1/2, 1/4 (third position padding); row 1: 1/8 (then pad)
    p = torch.tensor([[0.5, 0.25, 0.9], [0.125, 0.3, 0.3]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    logp = p.log().requires_grad_(True)
    loss = sft_loss(logp, mask)
    # −(ln ½ + ln ¼ + ln ⅛)/3 = (1 + 2 + 3)·ln 2 / 3 = 2 ln 2
    assert loss.item() == pytest.approx(2 * math.log(2), abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, torch.where(mask, -1 / 3, 0.0))
    # a micro-batch over the step's global count (6 tokens): half the value, half the gradient
    logp.grad = None
    half = sft_loss(logp, mask, torch.tensor(6.0))
    half.backward()
    assert half.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.allclose(logp.grad, torch.where(mask, -1 / 6, 0.0))
    assert sft_loss(logp, torch.zeros_like(mask)).item() == 0.0


def test_sft_loss_equals_the_cross_entropy_of_the_target_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    ours = sft_loss(logp, mask)
    (grad,) = torch.autograd.grad(ours, logits)
    ref = F.cross_entropy(logits[mask], targets[mask])  # mean over the 8 target tokens
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-7)
    # by hand: (softmax − one-hot)/N on target positions, 0 on padding
    hand = (logits.softmax(-1) - F.one_hot(targets, 7)) / 8 * mask[..., None]
    assert torch.allclose(grad, hand.detach(), atol=1e-7)


def _cfg(out, steps, **train):
    return config_from_dict({"job": "toy", "toy": TOY, "train": {
        "steps": steps, "prompts_per_step": 4, "group_size": 4, "progress": False, "lr": 0.01,
        "output_dir": str(out), "log_every": 100, "seed": 3, "export": False, **train}})


def _run(out, steps, sft_steps=3, lr=0.05, **train):
    cfg = _cfg(out, steps, **train)
    prompts = make_prompts(cfg.task, 3)
    data = SFTData(len(prompts), lambda i, rng: {"prompt": prompts[i],
                                                 "target": prompts[i][::-1]})
    stage = SFTStage(sft_steps, data, per_step=4, repeats=2, seed=3, lr=lr)
    policy = ToyPolicy(cfg.task, seed=3)
    summary = run_training(cfg, policy, digit_reward, prompts,
                           [{"target": p[::-1]} for p in prompts], sft=stage)
    return summary, policy, torch.load(out / "final.pt", weights_only=True)


def test_the_lr_is_the_stages_during_sft_and_put_back_after():
    seen = []

    class Opt(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)
    stage = SFTStage(1, SFTData(2, lambda i, rng: {"prompt": [1, 2, 3], "target": [3, 2, 1]}),
                     per_step=2, lr=0.5)
    cfg = _cfg("unused", 1)
    policy = ToyPolicy(cfg.task)
    from types import SimpleNamespace

    from mmrl.train.distributed import Dist
    from mmrl.train.loop import LoopSettings
    opt = Opt(policy.parameters(), lr=0.01)
    run = SimpleNamespace(step=0, dist=Dist(), opt=opt, policy=policy,
                          settings=LoopSettings(micro_batch_size=1))
    m = stage.run_step(run)
    assert seen == [0.5] and opt.param_groups[0]["lr"] == 0.01
    assert m["sft_tokens"] == 8 and math.isfinite(m["loss"])  # two 1-row micro-batches


def test_sft_steps_come_first_and_a_run_resumed_mid_sft_ends_with_the_same_weights(tmp_path):
    summary, _, full = _run(tmp_path / "a", steps=4)
    hist = summary["history"]
    assert [bool(m.get("sft_step")) for m in hist] == [True] * 3 + [False]
    assert all(m["sft_targets"] == 8 and m["sft_tokens"] == 8 * 4 for m in hist[:3])
    assert hist[2]["loss"] < hist[0]["loss"]  # teacher forcing on the reversed digits learns
    assert "reward_mean" in hist[3]  # then a GRPO step
    _run(tmp_path / "b", steps=2, save_every=1)  # stops after SFT step 1 of 3
    _, _, resumed = _run(tmp_path / "b", steps=4, save_every=1)
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_step_batch_is_a_function_of_its_index_and_ranks_split_records():
    data = SFTData(5, lambda i, rng: (i, rng.random()))
    stage = SFTStage(4, data, per_step=3, repeats=2, seed=1)
    assert stage.batch(2) == stage.batch(2) and stage.batch(2) != stage.batch(3)
    both = stage.batch(2, 0, 2) + stage.batch(2, 1, 2)
    assert sorted(both) == sorted(stage.batch(2))
    assert [i for i, _ in stage.batch(2, 0, 2)][::2] == [i for i, _ in stage.batch(2, 0, 2)][1::2]
    with pytest.raises(ValueError, match="per_step"):
        SFTStage(1, data, per_step=0)
